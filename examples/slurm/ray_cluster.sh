# Start a Ray cluster on the nodes of a Slurm allocation and stop exactly the Ray nodes started here.
# Sourced by search.sbatch (and by tests/test_cluster_recipes.py); bash 4.4 or later.
#
# Every Ray node is one `srun ... ray start --block` step run in the background of the batch
# script. `ray start --block` stays in the foreground of its step and, on SIGTERM, stops the
# processes of its own node (GCS, raylet, dashboard, workers) and exits. srun forwards the signals
# it gets to its tasks, so killing the background srun processes (ray_stop_started) stops these
# nodes and nothing else: never a machine-wide `ray stop`, which would also stop other users' or
# other jobs' Ray on a shared node.
#
# Settings (environment variables):
#   RAY_HEAD_ARGS, RAY_WORKER_ARGS  extra `ray start` arguments for the head / each worker
#                                   (word-split), e.g. "--object-store-memory=8000000000"
#   RAY_START_TIMEOUT               seconds to wait for the head and then for all nodes (default 300)
#   RAY_STOP_TIMEOUT                seconds ray_stop_started waits before SIGKILL (default 90; a
#                                   node drains for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 30 s)

RAY_SRUN_PIDS=()  # the background srun processes started here: [0] is the head

slurm_gpus_per_node() {
  # GPUs this job has on each node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("4", "a100:4",
  # "a100:2,v100:2" add up), else 0.
  if [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[0-9]+$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"
    return
  fi
  local total=0 item count items
  IFS=, read -ra items <<< "${SLURM_GPUS_PER_NODE:-}"
  for item in ${items[@]+"${items[@]}"}; do
    count=${item##*:}
    if [[ "$count" =~ ^[0-9]+$ ]]; then
      total=$((total + count))
    fi
  done
  echo "$total"
}

ray_node_ip() {
  # The first non-loopback IPv4 address of node $1, looked up on that node through srun.
  local node=$1 ip lookup
  for lookup in "-I" "--ip-address"; do
    for ip in $(srun --nodes=1 --ntasks=1 -w "$node" hostname "$lookup" 2>/dev/null); do
      if [[ "$ip" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ && "$ip" != 127.* ]]; then
        echo "$ip"
        return 0
      fi
    done
  done
  echo "ray_cluster: no IPv4 address found for node $node (set RAY_HEAD_IP)" >&2
  return 1
}

ray_check_storage() {
  # Fail unless storage $1 (a path; URIs such as s3://... are not checked) is visible from every
  # node in $2...: Tune's trials write their results and checkpoints there from the node they run on.
  local storage=$1 marker node
  shift
  [[ "$storage" == *://* ]] && return 0
  mkdir -p "$storage"
  marker="$storage/.pcl_tune_node_check.${SLURM_JOB_ID:-$$}"
  touch "$marker"
  for node in "$@"; do
    if ! srun --nodes=1 --ntasks=1 -w "$node" test -e "$marker"; then
      rm -f "$marker"
      echo "ray_cluster: $node does not see $storage: PCL_TUNE_STORAGE must be on a file system every" \
        "node mounts (NFS, Lustre...) or an s3:// URI, not a node-local path" >&2
      return 1
    fi
  done
  rm -f "$marker"
}

_ray_port_open() {  # host port: does something accept TCP connections there? (2 s at most)
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

ray_start_head() {
  # Start the head on node $1 with address $2 and GCS port $3 (a background srun step).
  local node=$1 ip=$2 port=$3 extra
  if _ray_port_open "$ip" "$port"; then
    echo "ray_cluster: port $port on $ip is already in use (another Ray?); choose another with RAY_PORT" >&2
    return 1
  fi
  read -ra extra <<< "${RAY_HEAD_ARGS:-}"
  srun --nodes=1 --ntasks=1 -w "$node" ray start --head --node-ip-address="$ip" --port="$port" \
    --num-cpus="${SLURM_CPUS_PER_TASK:-1}" --num-gpus="$(slurm_gpus_per_node)" \
    ${extra[@]+"${extra[@]}"} --block &
  RAY_SRUN_PIDS+=("$!")
}

ray_wait_for_head() {
  # Wait until the head's GCS ($1:$2) accepts connections; fail if its step ended first.
  local ip=$1 port=$2 deadline=$((SECONDS + ${RAY_START_TIMEOUT:-300}))
  until _ray_port_open "$ip" "$port"; do
    if ! kill -0 "${RAY_SRUN_PIDS[0]}" 2>/dev/null; then
      echo "ray_cluster: the Ray head exited before its port $ip:$port opened (its output is above)" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "ray_cluster: the Ray head did not answer at $ip:$port in ${RAY_START_TIMEOUT:-300} s" >&2
      return 1
    fi
    sleep 1
  done
}

ray_start_worker() {
  # Start a worker on node $1 that joins the head at address $2 (a background srun step).
  local node=$1 address=$2 extra
  read -ra extra <<< "${RAY_WORKER_ARGS:-}"
  srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$address" \
    --num-cpus="${SLURM_CPUS_PER_TASK:-1}" --num-gpus="$(slurm_gpus_per_node)" \
    ${extra[@]+"${extra[@]}"} --block &
  RAY_SRUN_PIDS+=("$!")
}

ray_wait_for_nodes() {
  # Wait until $2 nodes are alive in the cluster at $1; fail early if a node's step has ended.
  python - "$1" "$2" "${RAY_START_TIMEOUT:-300}" "${RAY_SRUN_PIDS[@]}" <<'PY'
import os
import sys
import time

import ray

address, want, timeout, pids = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    if alive >= want:
        print(f"ray_cluster: {alive} Ray nodes are up at {address}", flush=True)
        break
    ended = []
    for pid in pids:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            ended.append(pid)
    if ended or time.monotonic() > deadline:
        why = f"the srun steps {' '.join(ended)} ended" if ended else f"waited {timeout:g} s"
        sys.exit(f"ray_cluster: {alive} of {want} Ray nodes joined ({why}; their output is above)")
    time.sleep(2)
PY
}

ray_stop_started() {
  # Stop the Ray nodes started here: SIGTERM to their srun processes, wait, SIGKILL what is left.
  local pid deadline=$((SECONDS + ${RAY_STOP_TIMEOUT:-90}))
  ((${#RAY_SRUN_PIDS[@]})) || return 0
  kill -TERM "${RAY_SRUN_PIDS[@]}" 2>/dev/null || true
  for pid in "${RAY_SRUN_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "ray_cluster: srun $pid still running after ${RAY_STOP_TIMEOUT:-90} s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  RAY_SRUN_PIDS=()
}

ray_setup_auth() {
  # One token for the head, the workers and the driver. Ray 2.60's `ray start` turns token auth on
  # only when RAY_AUTH_MODE=token or a token already exists (ray.init alone defaults to it), so the
  # mode is set here for every process this script starts. The token comes from RAY_AUTH_TOKEN,
  # else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, created here when missing: with the
  # default file every node must see the same home directory. RAY_AUTH_MODE=disabled turns auth
  # off (only on a private network: anyone who reaches the head can then run code on the nodes).
  if [[ "${RAY_AUTH_MODE:-token}" == disabled ]]; then
    export RAY_AUTH_MODE=disabled
    return 0
  fi
  export RAY_AUTH_MODE=token
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    return 0
  fi
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      echo "ray_cluster: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
      return 1
    fi
    return 0
  fi
  ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token if there is none
}
