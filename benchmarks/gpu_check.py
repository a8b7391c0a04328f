"""GPU check: k-means, training throughput and ProtoNCE on one GPU, against the issue's targets.

Meant for a single-GPU machine that has PyTorch and torchvision and nothing else of this
project's dependencies (no Ray, Optuna, faiss, pandas, scikit-learn; no network), given only the
repository: it puts the repository root on ``sys.path`` itself and imports only
``pcl_tune.clustering``, ``pcl_tune.losses``, ``pcl_tune.model`` and ``pcl_tune.augment`` (torch
and numpy only, plus PyYAML through ``pcl_tune.config``; where PyYAML is missing a stand-in
module is registered, since no YAML is read here). Ray and Optuna are never imported, faiss only
when it is installed and only to time its k-means. It prints which optional pieces it found, then
one table, and writes it to ``<out>/gpu_check.md`` and ``<out>/gpu_check.csv``.

Rows (full sizes; ``--quick`` shrinks every one of them):

* **k-means** - ``pcl_tune.clustering.cluster(..., backend="torch")`` of 1 280 000 x 128
  L2-normalised features (a gaussian mixture, generated on the device) into 25 000, 50 000 and
  100 000 clusters, 20 iterations, one run each (``nredo=1``); seconds (with the CPU-side
  concentration and the copy of the result to the CPU, as in training) and the k-means
  objective. Target: the three levels together within 20 s. faiss's GPU k-means
  (``backend="faiss-gpu"``) is timed too when faiss has a GPU build (its memory is not torch's
  and shows as n/a); faiss's CPU build only in ``--quick`` runs.
* **training** - images/s of the training step of ``pcl_tune.train.epoch`` (two batched MoCo v2
  augmentations, momentum update, query/key forward under bf16 autocast, ``pcl_loss``, the
  divergence check, backward, SGD step, enqueue, reading the loss parts), written out here
  without the data loader: synthetic uint8 images already on the GPU. "with prototypes" adds
  three levels of 25 000 / 50 000 / 100 000 synthetic prototypes (r = 16 384 negatives each,
  assignments of a 1.28 M-image dataset gathered per batch, the CPU generator of the training
  loop for the negative draw); "plain MoCo" is the same step with no levels (InfoNCE alone,
  as in the warm-up epochs). ResNet-18 (small stem) on 32 px crops and ResNet-50 on 224 px
  crops of 256 px images, batch 256. Plain and prototype blocks alternate; median of the blocks.
  Target: with prototypes >= 0.9x the plain throughput.
* **proto_nce** - ``pcl_tune.losses.proto_nce`` (duplicates="dedupe", the CPU generator of the
  training loop; and once with a generator on the device) against the reference PCL algorithm
  (:func:`reference_proto_nce`: Python sets and ``random.sample``), forward + backward to ``q``,
  B = 256, M = 100 000, r = 16 384, D = 128; median seconds per call. Target: >= 20x faster than
  the reference. A sanity row checks that both losses are finite and within 10 % of each other
  (they draw different negatives, so they are not equal); it is judged on every device.

Every row carries the peak GPU memory (``torch.cuda.max_memory_allocated``, reset before the
row). Targets are judged only on CUDA at full sizes; elsewhere the result reads ``n/a (cpu)`` or
``n/a (quick)``. A measurement that raises (e.g. out of memory) leaves an ERROR row and the
others still run. The exit code is 1 when a row is an ERROR or the sanity row fails, else 0
(missed performance targets show as FAIL in the table only).

Run ``python benchmarks/gpu_check.py`` on the GPU machine (writes benchmarks/results/gpu_check.*)
or ``python benchmarks/gpu_check.py --quick`` on a CPU as a smoke test (tiny sizes, under a
minute on 2 cores; writes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS: tuple[str, ...] = ("kmeans", "train", "proto")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Packages reported by find_spec only, never imported (ray and optuna must not be).
NOT_IMPORTED: tuple[str, ...] = ("ray", "optuna", "pandas", "sklearn")


# --------------------------------------------------------------------------- imports


def _yaml_stand_in() -> types.ModuleType:
    """A module named ``yaml`` with what ``pcl_tune.config`` touches at import time; parsing raises."""
    mod = types.ModuleType("yaml")

    class YAMLError(Exception):
        pass

    class SafeLoader:
        @classmethod
        def add_implicit_resolver(cls, *args: Any, **kwargs: Any) -> None:
            return None

    def load(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PyYAML is not installed; gpu_check registered a stand-in that reads no YAML")

    mod.YAMLError = YAMLError  # type: ignore[attr-defined]
    mod.SafeLoader = SafeLoader  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.__gpu_check_stand_in__ = True  # type: ignore[attr-defined]
    return mod


def ensure_importable() -> str:
    """Put the repository root and benchmarks/ on sys.path; make ``import yaml`` work.

    Returns how PyYAML was found: ``"installed"`` or ``"missing (stand-in registered)"``.
    ``pcl_tune.config`` imports yaml at module level, and pcl_tune.clustering and pcl_tune.losses
    import pcl_tune.config.
    """
    for path in (REPO, REPO / "benchmarks"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if "yaml" in sys.modules:
        stand_in = getattr(sys.modules["yaml"], "__gpu_check_stand_in__", False)
        return "missing (stand-in registered)" if stand_in else "installed"
    try:
        importlib.import_module("yaml")
        return "installed"
    except ImportError:
        sys.modules["yaml"] = _yaml_stand_in()
        return "missing (stand-in registered)"


def optional_pieces(yaml_state: str) -> dict[str, str]:
    """What was found of the optional dependencies; ray, optuna, pandas and sklearn are not imported."""
    found: dict[str, str] = {}
    try:
        import faiss

        version = getattr(faiss, "__version__", "?")
        get = getattr(faiss, "get_num_gpus", None)
        gpus = int(get()) if get is not None else 0
        found["faiss"] = f"importable ({version})"
        found["faiss GPU build"] = f"yes, {gpus} GPU(s)" if gpus > 0 else "no (CPU build)"
    except ImportError as e:
        found["faiss"] = f"not importable ({e})"
        found["faiss GPU build"] = "no"
    for name in NOT_IMPORTED:
        found[name] = "installed (not imported)" if importlib.util.find_spec(name) is not None else "not installed"
    found["yaml"] = yaml_state
    return found


# --------------------------------------------------------------------------- rows and the table


@dataclass
class Row:
    """One line of the table.

    ``target`` with ``better`` (``"<="`` or ``">="``) is the issue's target for ``value``;
    ``always_judged`` rows (correctness) are judged on every device and size.
    """

    what: str
    size: str
    value: float
    unit: str
    target: float | None = None
    better: str = ""
    peak_mib: float | None = None
    note: str = ""
    always_judged: bool = False
    error: bool = False

    def vs_target(self) -> float | None:
        return None if self.target is None or self.error else self.value / self.target

    def verdict(self, judged: str | None) -> str:
        """``"pass"``/``"FAIL"``, ``"-"`` without a target, or ``judged`` (e.g. "n/a (cpu)") when not
        judged; ``"ERROR"`` for the row of a measurement that raised."""
        if self.error:
            return "ERROR"
        if self.target is None:
            return "-"
        if judged is not None and not self.always_judged:
            return judged
        if not math.isfinite(self.value):
            return "FAIL"
        ok = self.value <= self.target if self.better == "<=" else self.value >= self.target
        return "pass" if ok else "FAIL"


def _fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "img/s":
        return f"{value:.0f} img/s"
    if unit == "x":
        return f"{value:.2f}x"
    if not math.isfinite(value):
        return "-"
    return f"{value:.4g} {unit}".strip()


TABLE_HEAD: tuple[str, ...] = ("what", "size", "value", "target", "value/target", "peak GPU MiB", "result",
                               "notes")


def format_table(rows: Sequence[Row], judged: str | None) -> str:
    """Markdown table of ``rows``; ``judged`` as in :meth:`Row.verdict`."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 5 + ["---"]) + "|"]
    for r in rows:
        ratio = r.vs_target()
        cells = [
            r.what, r.size, _fmt_value(r.value, r.unit),
            f"{r.better} {_fmt_value(r.target, r.unit)}" if r.target is not None else "-",
            f"{ratio:.2f}" if ratio is not None else "-",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a",
            r.verdict(judged), r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], judged: str | None, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["what", "size", "value", "unit", "target", "better", "value_over_target", "peak_gpu_mib",
                    "result", "notes"])
        for r in rows:
            ratio = r.vs_target()
            w.writerow([r.what, r.size, repr(r.value), r.unit, "" if r.target is None else r.target, r.better,
                        "" if ratio is None else f"{ratio:.4f}", "" if r.peak_mib is None else f"{r.peak_mib:.1f}",
                        r.verdict(judged), r.note])


# --------------------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak memory allocated by torch on ``device`` since :func:`reset_peak`, MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- k-means


def mixture_features(n: int, dim: int, components: int, noise: float, device: torch.device, seed: int) -> Tensor:
    """(n, dim) float32 L2-normalised gaussian-mixture samples, generated on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(components, dim, generator=g, device=device), dim=1)
    comp = torch.randint(components, (n,), generator=g, device=device)
    x = centres[comp]
    x.add_(noise * torch.randn(n, dim, generator=g, device=device))
    return F.normalize(x, dim=1)


def kmeans_rows(x: Tensor, ks: Sequence[int], backend: str, niter: int, target_s: float | None,
                device: torch.device, seed: int) -> list[Row]:
    """One row per k (seconds, objective) and a total row judged against ``target_s``."""
    from pcl_tune.clustering import cluster

    n, dim = x.shape
    warm = x[: min(n, 50_000)]
    cluster(warm, min(2000, max(2, warm.shape[0] // 10)), temperature=0.2, seed=seed, niter=2, nredo=1,
            backend=backend)  # warm-up: CUDA context, cuBLAS handles, faiss resources
    rows, total, peaks = [], 0.0, []
    for i, k in enumerate(ks):
        reset_peak(device)
        dt, levels = timed(lambda k=k, i=i: cluster(x, k, temperature=0.2, seed=seed + i, niter=niter, nredo=1,
                                                    backend=backend), device)
        peak = None if backend.startswith("faiss") else peak_mib(device)
        peaks.append(peak)
        total += dt
        level = levels[0]
        print(f"k-means {backend:<9} k={k:>6}: {dt:8.3f} s  objective {level.objective:.6g}", flush=True)
        rows.append(Row(f"k-means {backend}", f"{n}x{dim} -> {k}, {niter} it", dt, "s", peak_mib=peak,
                        note=f"objective {level.objective:.6g}"))
    known = [p for p in peaks if p is not None]
    rows.append(Row(f"k-means {backend}, {len(ks)} levels", f"{n}x{dim} -> " + "/".join(map(str, ks)), total, "s",
                    target=target_s, better="<=", peak_mib=max(known) if known else None,
                    note="sum of the levels" + ("; faiss memory is not torch's" if backend.startswith("faiss") else "")))
    return rows


# --------------------------------------------------------------------------- training throughput


@dataclass(frozen=True)
class TrainCase:
    """One training-throughput comparison."""

    name: str
    backbone: str
    small_stem: bool
    crop: int  # augmented crop side
    source: int  # side of the synthetic uint8 images
    batch: int
    queue: int


@dataclass
class SyntheticLevel:
    """A clustering level of a virtual dataset: prototypes, every image's assignment, concentration."""

    centroids: Tensor
    assignment: Tensor
    concentration: Tensor


def synthetic_levels(num_images: int, counts: Sequence[int], dim: int, device: torch.device,
                     seed: int) -> list[SyntheticLevel]:
    g = torch.Generator().manual_seed(seed)
    levels = []
    for m in counts:
        levels.append(SyntheticLevel(
            centroids=F.normalize(torch.randn(m, dim, generator=g), dim=1).to(device),
            assignment=torch.randint(m, (num_images,), generator=g).to(device),
            concentration=(0.05 + 0.45 * torch.rand(m, generator=g)).to(device),
        ))
    return levels


def train_throughput(case: TrainCase, levels: Sequence[SyntheticLevel], num_negatives: int, num_images: int,
                     steps: int, reps: int, warmup: int, device: torch.device,
                     seed: int) -> dict[str, tuple[float, float | None]]:
    """Median images/s and peak MiB of the plain and the prototype step: {"plain": ..., "proto": ...}."""
    from pcl_tune.augment import MoCoV2Augment
    from pcl_tune.losses import LevelBatch, PrototypeLossConfig, pcl_loss
    from pcl_tune.model import MoCo

    torch.manual_seed(seed)
    amp = device.type == "cuda"
    model = MoCo(case.backbone, "mlp", 128, queue_size=case.queue, momentum=0.99,
                 small_stem=case.small_stem).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = MoCoV2Augment(case.crop, IMAGENET_MEAN, IMAGENET_STD)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    neg_gen = torch.Generator().manual_seed(seed + 2)  # on the CPU, as RunState's
    proto_cfg = PrototypeLossConfig(kind="proto_nce", num_negatives=num_negatives, duplicates="dedupe")
    img_gen = torch.Generator(device=device).manual_seed(seed + 3)
    pool = [torch.randint(0, 256, (case.batch, 3, case.source, case.source), generator=img_gen, device=device,
                          dtype=torch.uint8) for _ in range(2)]
    idx_gen = torch.Generator().manual_seed(seed + 4)

    def step(images: Tensor, with_levels: bool) -> None:
        # pcl_tune.train.epoch.train_epoch's loop body, without the loader and the distributed calls.
        im_q = augment(images, aug_gen).contiguous(memory_format=torch.channels_last)
        im_k = augment(images, aug_gen).contiguous(memory_format=torch.channels_last)
        model.momentum_update()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            q = F.normalize(model.encoder_q(im_q).float(), dim=1)
            k = model.keys(im_k).float()
        batch_levels = []
        if with_levels:
            index = torch.randint(num_images, (images.shape[0],), generator=idx_gen).to(device)
            batch_levels = [LevelBatch(lv.centroids, lv.assignment[index], lv.concentration) for lv in levels]
        loss, parts = pcl_loss(q, k, model.queue, batch_levels, temperature=0.2, config=proto_cfg,
                               proto_weight=1.0, generator=neg_gen)
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"loss is {loss.item()} in the {case.name} throughput run")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.enqueue(k.detach())
        for v in parts.values():
            float(v)

    modes = {"plain": False, "proto": True}
    for with_levels in modes.values():
        for i in range(warmup):
            step(pool[i % 2], with_levels)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, float | None] = {m: None for m in modes}
    for rep in range(reps):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            reset_peak(device)

            def block(mode: str = mode) -> None:
                for i in range(steps):
                    step(pool[i % 2], modes[mode])

            dt, _ = timed(block, device)
            rates[mode].append(steps * case.batch / dt)
            p = peak_mib(device)
            if p is not None:
                peaks[mode] = max(p, peaks[mode] or 0.0)
            print(f"{case.name} {mode:<5} block {rep + 1}/{reps}: {rates[mode][-1]:9.1f} img/s", flush=True)
    return {m: (statistics.median(rates[m]), peaks[m]) for m in modes}


def train_rows(case: TrainCase, result: dict[str, tuple[float, float | None]], level_counts: Sequence[int],
               num_negatives: int, target: float | None) -> list[Row]:
    size = f"batch {case.batch}, {case.crop} px"
    plain, proto = result["plain"], result["proto"]
    levels = "/".join(map(str, level_counts))
    return [
        Row(f"train {case.name}, plain MoCo", size, plain[0], "img/s", peak_mib=plain[1],
            note=f"queue {case.queue}"),
        Row(f"train {case.name}, with prototypes", size, proto[0], "img/s", peak_mib=proto[1],
            note=f"levels {levels}, r={num_negatives}"),
        Row(f"train {case.name}, prototypes/plain", size, proto[0] / plain[0], "x", target=target, better=">="),
    ]


# --------------------------------------------------------------------------- ProtoNCE vs the reference


def reference_proto_nce(q: Tensor, prototypes: Tensor, assignment: Tensor, concentration: Tensor, r: int,
                        rng: random.Random | None = None) -> Tensor:
    """ProtoNCE of one level as the reference PCL code computes it (duplicate positives not handled).

    Each row's positive is its own cluster; the r negatives are ``random.sample`` of the Python set
    of all cluster ids minus the set of the batch's positive ids; the columns are the B positives
    (repeats kept) then the negatives, the logits ``q . mu / phi`` of each column, labels 0..B-1.
    Like the reference it raises (ValueError from random.sample) when fewer than r negatives remain.

    Args:
        q: (B, D) queries; prototypes: (M, D); assignment: (B,) long; concentration: (M,).
        r: number of negatives.
        rng: a ``random.Random`` (default: the ``random`` module's global generator).
    """
    sample = rng.sample if rng is not None else random.sample
    pos_proto_id = assignment.long()
    all_proto_id = list(range(prototypes.shape[0]))
    neg_proto_id = set(all_proto_id) - set(pos_proto_id.tolist())
    # random.sample(set) did tuple(set) before Python 3.11 removed set support: the same here.
    neg_list = sample(tuple(neg_proto_id), r)
    neg_ids = torch.tensor(neg_list, dtype=torch.long, device=q.device)
    ids = torch.cat([pos_proto_id, neg_ids])
    logits = torch.mm(q, prototypes[ids].t().to(q.dtype)) / concentration[ids].to(q.dtype)
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels)


def proto_rows(batch: int, num_protos: int, r: int, dim: int, calls: int, ref_calls: int, warmup: int,
               target: float | None, device: torch.device, seed: int) -> list[Row]:
    from pcl_tune.losses import proto_nce

    g = torch.Generator().manual_seed(seed)
    q0 = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    protos = F.normalize(torch.randn(num_protos, dim, generator=g), dim=1).to(device)
    conc = (0.05 + 0.45 * torch.rand(num_protos, generator=g)).to(device)
    assignment = torch.randint(num_protos, (batch,), generator=g).to(device)
    unique = int(torch.unique(assignment).numel())
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 2)
    rng = random.Random(seed + 3)

    def fwd_bwd(loss_fn: Callable[[Tensor], Tensor]) -> Callable[[], float]:
        def call() -> float:
            q = q0.clone().requires_grad_(True)
            loss = loss_fn(q)
            loss.backward()
            return float(loss.detach())
        return call

    methods: dict[str, tuple[Callable[[], float], int]] = {
        "ours": (fwd_bwd(lambda q: proto_nce(q, protos, assignment, conc, r, duplicates="dedupe",
                                             generator=cpu_gen)[0]), calls),
        "ours_devgen": (fwd_bwd(lambda q: proto_nce(q, protos, assignment, conc, r, duplicates="dedupe",
                                                    generator=dev_gen)[0]), calls),
        "reference": (fwd_bwd(lambda q: reference_proto_nce(q, protos, assignment, conc, r, rng)), ref_calls),
    }
    secs: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    losses: dict[str, float] = {}
    for name, (call, n) in methods.items():
        for _ in range(warmup):
            call()
        reset_peak(device)
        times = []
        for _ in range(n):
            dt, value = timed(call, device)
            times.append(dt)
            losses[name] = value
        secs[name] = statistics.median(times)
        peaks[name] = peak_mib(device)
        print(f"proto_nce {name:<11}: {secs[name] * 1e3:9.3f} ms/call  loss {losses[name]:.4f}", flush=True)
    size = f"B={batch}, M={num_protos}, r={r}, D={dim}"
    ours, ref = losses["ours"], losses["reference"]
    rel = abs(ours - ref) / abs(ref) if math.isfinite(ours) and math.isfinite(ref) and ref != 0 else math.inf
    return [
        Row("proto_nce (ours), fwd+bwd", size, secs["ours"], "s", peak_mib=peaks["ours"],
            note=f"CPU generator, as the training loop; U={unique}"),
        Row("proto_nce (ours, device generator), fwd+bwd", size, secs["ours_devgen"], "s",
            peak_mib=peaks["ours_devgen"], note=f"{secs['reference'] / secs['ours_devgen']:.1f}x the reference"),
        Row("reference ProtoNCE, fwd+bwd", size, secs["reference"], "s", peak_mib=peaks["reference"],
            note="Python sets + random.sample"),
        Row("proto_nce speed-up vs reference", size, secs["reference"] / secs["ours"], "x", target=target,
            better=">=", note="reference s / ours s"),
        Row("proto_nce vs reference loss, rel. diff", size, rel, "", target=0.1, better="<=", always_judged=True,
            note=f"ours {ours:.4f}, reference {ref:.4f} (different negatives)"),
    ]


# --------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Sizes:
    """Every size of one run (full or quick)."""

    kmeans_n: int
    kmeans_dim: int
    kmeans_components: int
    clusters: tuple[int, ...]
    niter: int
    train_cases: tuple[TrainCase, ...]
    train_levels: tuple[int, ...]
    train_negatives: int
    train_images: int
    steps: int
    reps: int
    warmup: int
    proto_batch: int
    proto_m: int
    proto_r: int
    proto_calls: int
    ref_calls: int


FULL = Sizes(
    kmeans_n=1_280_000, kmeans_dim=128, kmeans_components=50_000, clusters=(25_000, 50_000, 100_000), niter=20,
    train_cases=(TrainCase("resnet18 32px", "resnet18", True, 32, 32, 256, 4096),
                 TrainCase("resnet50 224px", "resnet50", False, 224, 256, 256, 65536)),
    train_levels=(25_000, 50_000, 100_000), train_negatives=16_384, train_images=1_280_000,
    steps=15, reps=3, warmup=3, proto_batch=256, proto_m=100_000, proto_r=16_384, proto_calls=30, ref_calls=10,
)
QUICK = Sizes(
    kmeans_n=20_000, kmeans_dim=32, kmeans_components=100, clusters=(50, 100, 200), niter=20,
    train_cases=(TrainCase("resnet18 32px", "resnet18", True, 32, 32, 8, 256),
                 TrainCase("resnet50 32px", "resnet50", False, 32, 40, 8, 256)),
    train_levels=(500, 1000, 2000), train_negatives=256, train_images=20_000,
    steps=2, reps=1, warmup=1, proto_batch=32, proto_m=2000, proto_r=256, proto_calls=5, ref_calls=5,
)
TARGETS = {"kmeans_s": 20.0, "train_ratio": 0.9, "proto_speedup": 20.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test, under a minute)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for gpu_check.md/.csv (default benchmarks/results, "
                   "a temporary folder with --quick)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) CPU threads (default: 1 with "
                   "--quick, steadier on a busy 2-core machine; else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; expected a subset of {SECTIONS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    if device.type != "cuda" and not args.quick:
        p.error("the full sizes need a GPU (k-means of 1.28 M points into 100 000 clusters); "
                "use --quick for the CPU smoke test")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = QUICK if args.quick else FULL
    judged = None if device.type == "cuda" and not args.quick else ("n/a (cpu)" if device.type != "cuda"
                                                                    else "n/a (quick)")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.quick else RESULTS)

    t_start = time.perf_counter()
    yaml_state = ensure_importable()
    from _env import environment

    pieces = optional_pieces(yaml_state)
    if threads and "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = [
        f"Environment: {environment(device)}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, device {device} ({dev_name}), "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, {'quick' if args.quick else 'full'} sizes",
        "Optional pieces: " + "; ".join(f"{k}: {v}" for k, v in pieces.items()),
    ]
    print("\n".join(header), flush=True)

    rows: list[Row] = []

    def attempt(what: str, measure: Callable[[], list[Row]]) -> None:
        # One failing measurement (out of memory, a missing kernel) must not cost the others' rows.
        try:
            rows.extend(measure())
        except Exception as e:  # reported in the table and by the exit code
            traceback.print_exc()
            first = str(e).splitlines()[0][:150].replace("|", "/") if str(e) else ""
            rows.append(Row(what, "", math.nan, "", note=f"{type(e).__name__}: {first}", error=True))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    faiss_gpu = pieces["faiss GPU build"].startswith("yes")
    faiss_any = pieces["faiss"].startswith("importable")
    if "kmeans" in sections:
        x = mixture_features(sizes.kmeans_n, sizes.kmeans_dim, sizes.kmeans_components, 0.06, device, args.seed)
        backends = ["torch"]
        if faiss_gpu and device.type == "cuda":
            backends.append("faiss-gpu")
        elif faiss_any and args.quick:
            backends.append("faiss")
        if faiss_any and not faiss_gpu and not args.quick:
            print("faiss has no GPU build here: its CPU k-means is not timed at full size", flush=True)
        for backend in backends:
            attempt(f"k-means {backend}", lambda b=backend: kmeans_rows(x, sizes.clusters, b, sizes.niter,
                                                                       TARGETS["kmeans_s"], device, args.seed))
        del x
    if "train" in sections:
        levels = synthetic_levels(sizes.train_images, sizes.train_levels, 128, device, args.seed)
        for case in sizes.train_cases:
            attempt(f"train {case.name}", lambda c=case: train_rows(
                c, train_throughput(c, levels, sizes.train_negatives, sizes.train_images, sizes.steps, sizes.reps,
                                    sizes.warmup, device, args.seed),
                sizes.train_levels, sizes.train_negatives, TARGETS["train_ratio"]))
        del levels
    if "proto" in sections:
        attempt("proto_nce", lambda: proto_rows(sizes.proto_batch, sizes.proto_m, sizes.proto_r, 128,
                                                sizes.proto_calls, sizes.ref_calls, 3, TARGETS["proto_speedup"],
                                                device, args.seed))
    elapsed = time.perf_counter() - t_start

    table = format_table(rows, judged)
    verdicts = [r.verdict(judged) for r in rows]
    notes = (f"Targets (judged on CUDA at full sizes only, except the loss sanity row): k-means of the "
             f"levels together <= {TARGETS['kmeans_s']:g} s; training with prototypes >= "
             f"{TARGETS['train_ratio']:g}x plain MoCo; proto_nce >= {TARGETS['proto_speedup']:g}x faster than "
             f"the reference. value/target: <= 1 passes a '<=' target, >= 1 a '>=' target. Peak GPU memory: "
             f"torch.cuda.max_memory_allocated since the row started (n/a on CPU and for faiss). "
             f"{verdicts.count('pass')} pass, {verdicts.count('FAIL')} fail, {verdicts.count('ERROR')} error(s). Total run time {elapsed:.1f} s.")
    print(f"\n{table}\n\n{notes}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text("\n".join([*header, "", table, "", notes, ""]))
    write_csv(rows, judged, out / "gpu_check.csv")
    print(f"\nwrote {out / 'gpu_check.md'} and {out / 'gpu_check.csv'}")
    bad = [r for r in rows if r.error or (r.always_judged and r.verdict(judged) == "FAIL")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
