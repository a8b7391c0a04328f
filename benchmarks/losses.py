"""Timing of the prototype losses: pcl_tune's ProtoNCE vs the reference PCL code vs a matmul floor.

For each number of prototypes M the script times, per call (median over ``--calls`` calls after a
warm-up, the methods interleaved call by call so that machine noise hits them alike):

* ``floor``: the work no ProtoNCE can avoid, on columns selected beforehand - ``q @ P.T``,
  division by the pre-gathered temperatures, cross-entropy. ``P`` has ``B + r_eff`` rows, the
  column count of the reference (``r_eff = min(r, M - U)``, ``U`` unique positives).
* ``ours``: :func:`pcl_tune.losses.proto_nce` with ``duplicates="dedupe"`` (and, as extra
  columns, ``"remap"`` and ``"none"``).
* ``reference``: a literal re-implementation of the reference PCL code (Python set difference
  and ``random.sample`` of the negatives, gather, matmul, per-column temperature, labels
  ``arange(B)``). Where fewer than ``r`` negatives remain the reference would raise; here it is
  clamped so that it can be timed.
* ``reference+acc``: the same plus the arg-max accuracy of the reference training loop
  (``proto_nce`` always computes its accuracy).
* ``topk``: :func:`pcl_tune.losses.topk_prototype_loss` with k=3 (it scores all M prototypes).

Both the forward pass alone (``q`` without gradient) and forward + backward (gradient w.r.t.
``q``; prototypes and concentrations are constants, as in PCL) are timed.

Run ``python benchmarks/losses.py`` (CPU, full sizes, writes benchmarks/results/losses.md),
``--device cuda`` on a GPU machine (writes benchmarks/results/losses_cuda.md), ``--quick`` for a
smoke run that writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import environment
from torch import Tensor

from pcl_tune.losses import proto_nce, topk_prototype_loss

RESULTS = Path(__file__).resolve().parent / "results"
METHODS: tuple[str, ...] = ("floor", "ours", "reference", "reference+acc", "remap", "none", "topk")


@dataclass
class Case:
    """Inputs of one problem size, on the benchmark device."""

    q: Tensor  # (B, D)
    prototypes: Tensor  # (M, D)
    assignment: Tensor  # (B,)
    concentration: Tensor  # (M,)
    r: int
    floor_protos: Tensor  # (B + r_eff, D), pre-gathered
    floor_temps: Tensor  # (B + r_eff,)
    unique: int
    r_eff: int


def make_case(batch: int, dim: int, num_protos: int, r: int, device: torch.device, seed: int) -> Case:
    """Random L2-normalised q and prototypes, concentration in [0.05, 0.5], assignment with repeats."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    protos = F.normalize(torch.randn(num_protos, dim, generator=gen), dim=1)
    conc = 0.05 + 0.45 * torch.rand(num_protos, generator=gen)
    assignment = torch.randint(0, num_protos, (batch,), generator=gen)  # drawn with replacement
    unique = int(torch.unique(assignment).numel())
    r_eff = min(r, num_protos - unique)
    # The floor's columns: the batch's positives then r_eff other prototypes, gathered once here.
    is_neg = torch.ones(num_protos, dtype=torch.bool)
    is_neg[assignment] = False
    cand = is_neg.nonzero(as_tuple=True)[0]
    neg = cand[torch.randperm(cand.numel(), generator=gen)[:r_eff]]
    cols = torch.cat([assignment, neg])
    return Case(
        q=q.to(device), prototypes=protos.to(device), assignment=assignment.to(device),
        concentration=conc.to(device), r=r,
        floor_protos=protos[cols].contiguous().to(device), floor_temps=conc[cols].contiguous().to(device),
        unique=unique, r_eff=r_eff,
    )


def floor_loss(q: Tensor, selected: Tensor, temps: Tensor) -> Tensor:
    """Matmul, per-column temperature and cross-entropy on columns already gathered."""
    logits = (q @ selected.T) / temps
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels)


def reference_proto_nce(
    q: Tensor, prototypes: Tensor, assignment: Tensor, concentration: Tensor, r: int, rng: random.Random,
    accuracy: bool = False,
) -> Tensor:
    """The reference PCL ProtoNCE of one level, written out step by step (duplicates not handled).

    With ``accuracy`` it also computes the arg-max accuracy, as the reference training loop does for
    acc_proto (proto_nce always returns it), so that both do the same work.
    """
    pos_proto_id = assignment
    all_proto_id = set(range(prototypes.shape[0]))
    neg_proto_id = all_proto_id - set(pos_proto_id.tolist())
    neg_list = sorted(neg_proto_id)  # random.sample no longer accepts a set (Python >= 3.11)
    # The reference calls random.sample(neg, r) and raises when fewer than r remain; clamped here.
    neg_proto_id_list = rng.sample(neg_list, min(r, len(neg_list)))
    neg_ids = torch.tensor(neg_proto_id_list, dtype=torch.long, device=q.device)
    ids = torch.cat([pos_proto_id, neg_ids], dim=0)
    proto_selecteds = prototypes[ids]
    logits = torch.mm(q, proto_selecteds.t())
    temp_proto = concentration[ids]
    logits = logits / temp_proto
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    if accuracy:
        with torch.no_grad():
            (logits.argmax(dim=1) == labels).float().mean()
    return loss


def make_calls(case: Case, device: torch.device, seed: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """One closure per method, mapping q to the scalar loss."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    c = case

    def ours(mode: str) -> Callable[[Tensor], Tensor]:
        def call(q: Tensor) -> Tensor:
            return proto_nce(q, c.prototypes, c.assignment, c.concentration, c.r, duplicates=mode,  # type: ignore[arg-type]
                             generator=gen)[0]
        return call

    return {
        "floor": lambda q: floor_loss(q, c.floor_protos, c.floor_temps),
        "ours": ours("dedupe"),
        "reference": lambda q: reference_proto_nce(q, c.prototypes, c.assignment, c.concentration, c.r, rng),
        "reference+acc": lambda q: reference_proto_nce(q, c.prototypes, c.assignment, c.concentration, c.r, rng,
                                                       accuracy=True),
        "remap": ours("remap"),
        "none": ours("none"),
        "topk": lambda q: topk_prototype_loss(q, c.prototypes, 3, 0.1, 1.0),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    calls: dict[str, Callable[[Tensor], Tensor]], q: Tensor, *, backward: bool, n_calls: int, warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Median seconds per call of every method; methods interleaved call by call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + n_calls):
        for name, fn in calls.items():
            x = q.detach().clone().requires_grad_(backward)
            sync(device)
            t0 = time.perf_counter()
            if backward:
                fn(x).backward()
            else:
                with torch.no_grad():
                    fn(x)
            sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def format_table(rows: list[dict[str, float]]) -> str:
    head = ["M", "U", "cols", "floor ms", "ours ms", "reference ms", "ours/floor", "ours/reference",
            "reference+acc ms", "ours/(reference+acc)", "remap ms", "none ms", "topk(k=3) ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        ms = {m: 1e3 * r[m] for m in METHODS}
        cells = [f"{int(r['M'])}", f"{int(r['U'])}", f"{int(r['cols'])}",
                 f"{ms['floor']:.2f}", f"{ms['ours']:.2f}", f"{ms['reference']:.2f}",
                 f"{r['ours'] / r['floor']:.2f}x", f"{r['ours'] / r['reference']:.2f}x",
                 f"{ms['reference+acc']:.2f}", f"{r['ours'] / r['reference+acc']:.2f}x",
                 f"{ms['remap']:.2f}", f"{ms['none']:.2f}", f"{ms['topk']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--calls", type=int, default=None, help="timed calls per method (default 30, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer calls, no M=100000, nothing saved")
    p.add_argument("--sizes", default=None, help="comma-separated M values (default 100,25000,100000)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--negatives", type=int, default=16384, help="r")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown file for the tables (default benchmarks/results/"
                   "losses.md, losses_cuda.md on cuda; none with --quick)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda given but torch sees no GPU", file=sys.stderr)
        return 2
    n_calls = args.calls if args.calls is not None else (5 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [100, 25000] if args.quick else [100, 25000, 100000]
    out: Path | None
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = None
    else:
        out = RESULTS / ("losses_cuda.md" if device.type == "cuda" else "losses.md")

    env = environment(device)
    setup = (f"B={args.batch}, D={args.dim}, r={args.negatives}, float32, median of {n_calls} calls "
             f"after {warmup} warm-up, methods interleaved")
    print(f"Environment: {env}\nSetup: {setup}", flush=True)

    tables: dict[str, list[dict[str, float]]] = {"forward": [], "forward + backward": []}
    for m in sizes:
        case = make_case(args.batch, args.dim, m, args.negatives, device, args.seed + m)
        for title, backward in (("forward", False), ("forward + backward", True)):
            calls = make_calls(case, device, args.seed)
            med = time_methods(calls, case.q, backward=backward, n_calls=n_calls, warmup=warmup, device=device)
            row: dict[str, float] = {"M": m, "U": case.unique, "cols": args.batch + case.r_eff, **med}
            tables[title].append(row)
            print(f"M={m:>6} {title:<18} " + "  ".join(f"{k}={1e3 * v:.2f}ms" for k, v in med.items())
                  + f"  ours/floor={med['ours'] / med['floor']:.2f}  ours/ref={med['ours'] / med['reference']:.2f}",
                  flush=True)

    notes = (
        "U: unique positives in the batch; cols: B + min(r, M - U), the column count of the reference "
        "and of the floor (ours with dedupe uses U + min(r, M - U)). At M=100 fewer than r negatives "
        "remain: the reference would raise there, it is clamped to time it. ours = proto_nce(dedupe); "
        "remap/none = proto_nce with those modes; topk = topk_prototype_loss(k=3, lam=0.1, alpha=1) "
        "over all M prototypes. ours also computes the accuracy (an arg-max); reference and floor do not, "
        "reference+acc adds the arg-max accuracy that the reference training loop computes."
    )
    text = [f"Environment: {env}", "", f"Setup: {setup}", ""]
    for title, rows in tables.items():
        table = format_table(rows)
        print(f"\n## {title}\n\n{table}")
        text += [f"### {title}", "", table, ""]
    text += [notes, ""]
    print(f"\n{notes}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(text))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
