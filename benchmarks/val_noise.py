"""Noise of the search objective (kNN top-1 on the val split of the digit scenes): does rendering
more scenes per validation glyph (``data.digits_copies[1]``) shrink its standard error cheaply?

For each of ``--seeds`` training seeds: train one encoder with the demo search's fixed settings
(``search_spaces/demo.yaml``'s ``fixed:`` over the config defaults; 1 thread, no few-shot metrics)
and take its last-epoch key encoder, as the loop's evaluation judges it. Then, for each
``--copies`` c, render the same val glyphs (the seed's split) into c scenes each and measure,
against the unchanged train bank (1 scene per glyph):

* kNN top-1 (%) with the run's kNN settings, on render 0 (at c = 1 render 0 is the loop's own val
  split, so the value equals the last epoch's ``knn_top1``);
* n, the val scenes, and the binomial standard error sqrt(p (1 - p) / n) in points, which treats
  the n scenes as independent;
* the glyph-clustered bootstrap standard error in points (1000 resamples of the val glyphs with
  replacement, all c renders of a drawn glyph together);
* the render noise: the standard deviation of kNN over ``--renders`` renders of the same glyphs
  (render 0 and renders with other render seeds), the part of the noise that only the rendering
  causes and that more copies can average out;
* the seconds that embedding the val split and its kNN take (median over the renders), i.e. the
  val part of one evaluation.

    python benchmarks/val_noise.py [--epochs 60] [--seeds 0,1] [--copies 1,2,4,8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _env import environment_lines, publish
from sklearn.datasets import load_digits

from pcl_tune.config import TrainConfig, config_from_dict, load_config_file, merge
from pcl_tune.data import (
    DIGITS_FRACTIONS,
    DIGITS_SIZE,
    TensorImageDataset,
    _split_by_source,
    render_digit_scenes,
)
from pcl_tune.evaluate import knn_accuracy, knn_predict
from pcl_tune.train import CHECKPOINT_DIR, RunState, embed, train_loop

ROOT = Path(__file__).resolve().parent.parent
VAL_SPLIT = 1
"""Position of val in the (train, val, test) splits of :func:`pcl_tune.data.digit_scenes`."""


def demo_config(seed: int, epochs: int) -> TrainConfig:
    """The demo search's fixed settings over the defaults, 1 thread, no progress, no few-shot metrics."""
    fixed = load_config_file(ROOT / "search_spaces" / "demo.yaml")  # a search space: its ``fixed`` section
    return config_from_dict(merge(fixed, {"seed": seed, "epochs": epochs, "threads": 1, "progress": False,
                                          "eval.fewshot_episodes": 0}))


def default_render_seed(seed: int) -> int:
    """The render seed :func:`pcl_tune.data.digit_scenes` gives the val split of split seed ``seed``."""
    return seed * 1000 + 17 * VAL_SPLIT + 1


def render_seed(seed: int, render: int) -> int:
    """Render 0: the loop's own; others: seeds far from any that ``digit_scenes`` uses (seed * 1000 + 1..35)."""
    return default_render_seed(seed) + 1_000_003 * render


def render_val(cfg: TrainConfig, copies: int, seed_for_render: int) -> tuple[TensorImageDataset, np.ndarray]:
    """The val glyphs of ``cfg.seed``'s split rendered ``copies`` times each with ``seed_for_render``.

    Returns the dataset and the source-glyph id of each scene (a glyph's scenes are adjacent).
    """
    bunch = load_digits()
    glyphs = torch.from_numpy(bunch.images / 16.0).float()
    targets = np.asarray(bunch.target, dtype=np.int64)
    ids = _split_by_source(targets, DIGITS_FRACTIONS, cfg.seed)[VAL_SPLIT]
    src = np.repeat(ids, copies)
    scenes = render_digit_scenes(glyphs[src], size=cfg.data.image_size or DIGITS_SIZE, seed=seed_for_render,
                                 clutter=cfg.data.digits_clutter)
    return TensorImageDataset(scenes, torch.from_numpy(targets[src])), src


def clustered_bootstrap_se(correct: np.ndarray, copies: int, *, resamples: int = 1000, seed: int = 0) -> float:
    """Standard error (points) of the accuracy, resampling glyphs with all their ``copies`` scenes.

    Args:
        correct: (G * copies,) 0/1 per scene, the scenes of one glyph adjacent.
    """
    per_glyph = correct.reshape(-1, copies).mean(1)  # equal cluster sizes: mean of glyph means = accuracy
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, per_glyph.size, size=(resamples, per_glyph.size))
    return float(per_glyph[draws].mean(1).std(ddof=1)) * 100.0


def measure(run: RunState, bank: torch.Tensor, val: TensorImageDataset, copies: int) -> dict[str, Any]:
    """kNN of one rendered val split against the bank, its standard errors and the seconds it took."""
    cfg, d = run.cfg, run.data
    bank_labels = d.train.labels.to(run.device)
    t = time.perf_counter()
    _, feats = embed(run, val, head=False, backbone=True)  # as the loop's evaluate_epoch does
    assert feats is not None
    knn = knn_accuracy(feats, val.labels.to(run.device), bank, bank_labels, d.num_classes,
                       k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    seconds = time.perf_counter() - t
    pred = knn_predict(feats, bank, bank_labels, d.num_classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    correct = (pred.cpu() == val.labels).numpy().astype(np.float64)
    if abs(correct.mean() * 100.0 - knn) > 1e-3:  # float32 mean in knn_accuracy; one scene >= 0.03 points
        raise RuntimeError(f"knn_predict and knn_accuracy disagree: {correct.mean() * 100:.4f} vs {knn:.4f}")
    p, n = correct.mean(), correct.size
    return {"n": n, "knn %": knn, "binomial SE": float(np.sqrt(p * (1 - p) / n)) * 100.0,
            "clustered SE": clustered_bootstrap_se(correct, copies), "eval s": seconds}


def one_seed(seed: int, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train one encoder and measure every copies setting: (summary rows, per-render rows)."""
    cfg = demo_config(seed, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        history = train_loop(cfg, out_dir=tmp, verbose=False)
        pretrain_s = time.perf_counter() - t
        run = RunState.build(cfg)
        run.resume(Path(tmp) / CHECKPOINT_DIR)  # the last epoch's weights, those the loop judged last
    loop_knn = float(history[-1]["knn_top1"])
    print(f"seed {seed}: trained {cfg.epochs} epochs in {pretrain_s:.0f} s, last-epoch kNN {loop_knn:.2f} %",
          flush=True)
    _, bank = embed(run, run.data.train, head=False, backbone=True)
    assert bank is not None
    rows, renders = [], []
    for copies in args.copies:
        per_render = []
        for r in range(args.renders):
            val, _ = render_val(cfg, copies, render_seed(seed, r))
            if copies == 1 and r == 0 and not torch.equal(val.images, run.data.val.images):
                raise RuntimeError("render_val does not reproduce the loop's val split")
            m = measure(run, bank, val, copies)
            per_render.append(m)
            renders.append({"seed": seed, "copies": copies, "render": r, "render seed": render_seed(seed, r), **m})
        first = per_render[0]
        if copies == 1 and abs(first["knn %"] - loop_knn) > 1e-6:
            raise RuntimeError(f"kNN of the loop's val split {first['knn %']:.4f} != the loop's {loop_knn:.4f}")
        knns = [m["knn %"] for m in per_render]
        rows.append({"seed": seed, "copies": copies, "n": first["n"], "knn %": first["knn %"],
                     "binomial SE": first["binomial SE"], "clustered SE": first["clustered SE"],
                     "render sd": statistics.stdev(knns) if len(knns) > 1 else float("nan"),
                     "eval s": statistics.median(m["eval s"] for m in per_render)})
        print("  copies {copies}: n {n}, kNN {knn %:.2f} %, binomial SE {binomial SE:.2f}, clustered SE "
              "{clustered SE:.2f}, render sd {render sd:.2f}, eval {eval s:.3f} s".format_map(rows[-1]), flush=True)
    epoch_s = float(np.mean([h["time_epoch"] for h in history]))
    eval_s = float(np.mean([h["time_eval"] for h in history]))
    for row in rows:
        row.update(pretrain_s=pretrain_s, epoch_s=epoch_s, loop_eval_s=eval_s)
    return rows, renders


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (seed, copies) and, per copies, a ``mean`` row averaged over seeds."""
    cols = ["seed", "copies", "n", "knn %", "binomial SE", "clustered SE", "render sd", "eval s"]
    means = df[cols[1:]].groupby("copies", as_index=False).mean()
    means.insert(0, "seed", "mean")
    out = pd.concat([df[cols].astype({"seed": str}), means], ignore_index=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", default="0,1", help="training (and split) seeds, comma-separated")
    ap.add_argument("--copies", default="1,2,4,8", help="val scenes per glyph to measure, comma-separated")
    ap.add_argument("--renders", type=int, default=3, help="render seeds per copies setting, for the render sd")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.copies = [int(c) for c in args.copies.split(",")]
    torch.set_num_threads(1)
    header = environment_lines()
    print("\n".join(header), flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    renders: list[dict[str, Any]] = []
    for seed in args.seeds:
        r, rr = one_seed(seed, args)
        rows += r
        renders += rr
    df = pd.DataFrame(rows)
    table = summary_table(df)
    lines = [
        "# Validation split noise: more scenes per val glyph", "", *header, "",
        f"Seeds {', '.join(map(str, args.seeds))} x {args.epochs} epochs of the demo's fixed settings (1 thread; "
        f"mean pretraining {df['pretrain_s'].mean():.0f} s, {df['epoch_s'].mean():.2f} s per epoch of which "
        f"{df['loop_eval_s'].mean():.3f} s evaluation); last-epoch key encoder; train bank 1 scene per glyph; "
        f"the val glyphs of each seed's split rendered `copies` times. kNN % and the SEs (points) on render 0 "
        f"(at copies 1 the loop's own val split); clustered SE: bootstrap over glyphs, 1000 resamples; render sd: "
        f"sd of kNN % over {args.renders} render seeds; eval s: embedding the val split + kNN, median over the "
        f"renders. Total wall {time.perf_counter() - t0:.0f} s.",
        "", table.to_markdown(index=False, floatfmt=("", "", ".0f", ".2f", ".2f", ".2f", ".2f", ".3f")),
    ]
    publish("\n".join(lines), args.out, "val_noise", {"val_noise_runs": pd.DataFrame(renders)})


if __name__ == "__main__":
    main()
