"""The one registry of metric names the epoch loop reports.

Every other module reads this: the loop (which keys an epoch carries, in which order, NaN where a
metric was not measured), the space validator (what ``objective.metric`` may name) and the
analysis (direction, unit, whether a "best" value means anything). A new metric is added here
once.

Per-level metrics are reported as ``<name>_<level>`` (``acc_proto_0``, ``nmi_1``, ...), one per
clustering level of the cluster schedule, next to the level mean reported as ``<name>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["min", "max"]


@dataclass(frozen=True)
class Metric:
    """One reported metric.

    Attributes:
        name: the key in every epoch's result (per-level metrics: the stem, without ``_<level>``).
        direction: ``"max"`` or ``"min"``: what counts as better.
        unit: ``"%"``, ``"s"``, ``"images/s"`` or ``""``.
        per_level: also reported once per clustering level as ``<name>_<level>``.
        per_head: reported only by multi-head runs (``model.head: amcl``), once per projection
            head as ``<name>_<head>`` (the name ends in ``_head``: ``loss_inst_head_0``).
        has_best: whether a trial's best value over its epochs means something (not for a
            learning rate or a cluster count, which are settings, not results).
        measured_at: ``"epoch"`` (every epoch), ``"eval"`` (only at epochs where evaluation runs:
            NaN otherwise) or ``"clusters"`` (only once clustering has started: NaN in warm-up).
        doc: one line for tables and ``--help``.
    """

    name: str
    direction: Direction
    unit: str
    doc: str
    per_level: bool = False
    has_best: bool = True
    per_head: bool = False
    measured_at: Literal["epoch", "eval", "clusters"] = "epoch"


# The order here is the order of the keys in every reported epoch.
REGISTRY: tuple[Metric, ...] = (
    Metric("loss", "min", "", "total loss: InfoNCE + proto_weight x mean prototype loss"),
    Metric("loss_inst", "min", "", "InfoNCE (instance discrimination) loss"),
    Metric("acc_inst", "max", "%", "top-1 of the positive key among the queue in InfoNCE"),
    Metric("loss_proto", "min", "", "prototype loss (mean over levels)", per_level=True, measured_at="clusters"),
    Metric("acc_proto", "max", "%", "share of queries whose own prototype scores highest (mean over levels)",
           per_level=True, measured_at="clusters"),
    Metric("knn_top1", "max", "%", "weighted kNN top-1 of the val split against the train split", measured_at="eval"),
    Metric("fewshot_5w1s", "max", "%", "5-way 1-shot episodes on the val split (nearest class mean)",
           measured_at="eval"),
    Metric("fewshot_5w5s", "max", "%", "5-way 5-shot episodes on the val split (nearest class mean)",
           measured_at="eval"),
    Metric("nmi", "max", "", "NMI of the clusters against the train labels (mean over levels)", per_level=True,
           measured_at="eval"),
    Metric("ami", "max", "", "adjusted mutual information of the clusters against the train labels",
           per_level=True, measured_at="eval"),
    Metric("lr", "max", "", "learning rate of the epoch", has_best=False),
    Metric("images_per_s", "max", "images/s", "training throughput (all ranks)"),
    Metric("time_features", "min", "s", "embedding the train set for clustering"),
    Metric("time_clustering", "min", "s", "k-means and concentration, all levels"),
    Metric("time_train", "min", "s", "the training epoch"),
    Metric("time_eval", "min", "s", "evaluation"),
    Metric("time_epoch", "min", "s", "the whole epoch"),
    Metric("num_clusters", "max", "", "cluster count of the level (0 in warm-up)", per_level=True, has_best=False),
    Metric("loss_inst_head", "min", "", "multi-head: the head's tempered InfoNCE loss with its temperature penalty",
           per_head=True),
    Metric("acc_inst_head", "max", "%", "multi-head: top-1 of the positive key in the head's tempered logits",
           per_head=True),
    Metric("tau_pos_mean_head", "max", "", "multi-head: mean temperature of the head's positive pairs",
           per_head=True, has_best=False),
    Metric("tau_pos_p10_head", "max", "", "multi-head: 10th percentile of the head's positive-pair temperatures",
           per_head=True, has_best=False),
    Metric("tau_pos_p90_head", "max", "", "multi-head: 90th percentile of the head's positive-pair temperatures",
           per_head=True, has_best=False),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in REGISTRY}
# Keys of an epoch's result that are not metrics: its 1-based number and the counts as text.
EPOCH_KEY = "epoch"
CLUSTERS_KEY = "clusters"

_LEVEL = re.compile(r"^(?P<stem>.+)_(?P<level>\d+)$")


def lookup(name: str) -> Metric | None:
    """The registered metric behind ``name`` (``acc_proto_1`` -> ``acc_proto``); None if unknown."""
    if name in BY_NAME:
        return BY_NAME[name]
    m = _LEVEL.match(name)
    if m and m["stem"] in BY_NAME and (BY_NAME[m["stem"]].per_level or BY_NAME[m["stem"]].per_head):
        return BY_NAME[m["stem"]]
    return None


def level_names(num_levels: int) -> list[str]:
    """``["loss_proto_0", "loss_proto_1", ..., "num_clusters_1"]`` in registry order."""
    return [f"{m.name}_{i}" for m in REGISTRY if m.per_level for i in range(num_levels)]


def head_names(num_heads: int) -> list[str]:
    """``["loss_inst_head_0", ..., "tau_pos_p90_head_2"]`` in registry order ([] for a single head)."""
    return [f"{m.name}_{i}" for m in REGISTRY if m.per_head for i in range(num_heads)]


def reported_metrics(num_levels: int, num_heads: int = 0) -> list[str]:
    """Numeric metric names every epoch carries for a schedule of ``num_levels`` levels (and
    ``num_heads`` projection heads of a multi-head run), in order."""
    return ([m.name for m in REGISTRY if m.name != "num_clusters" and not m.per_head] + level_names(num_levels)
            + head_names(num_heads))


def direction(name: str, *, objective: str | None = None, mode: Direction = "max") -> Direction:
    """What counts as better for ``name``: the search's ``mode`` for its objective, else the registry's.

    Unregistered names (a metric an older or newer version reported) follow the naming rule the
    registry itself follows: ``loss*`` and ``time*`` are minimised, everything else maximised.
    """
    if objective is not None and name == objective:
        return mode
    m = lookup(name)
    if m is not None:
        return m.direction
    return "min" if name.startswith(("loss", "time")) else "max"


def unit(name: str) -> str:
    """The unit of ``name`` (``"%"``, ``"s"``, ``"images/s"`` or ``""``)."""
    m = lookup(name)
    return m.unit if m is not None else ""


def label(name: str) -> str:
    """``"knn_top1 (%)"``: the name with its unit, for axis labels and table headers."""
    u = unit(name)
    return f"{name} ({u})" if u else name


def has_best(name: str) -> bool:
    """Whether a best-over-epochs value of ``name`` means something."""
    m = lookup(name)
    return m.has_best if m is not None else True


def complete(metrics: dict[str, Any], num_levels: int, num_heads: int = 0) -> dict[str, Any]:
    """``metrics`` with every registered metric present: NaN where it was not measured this epoch
    (prototype metrics in warm-up, evaluation metrics between evaluations)."""
    out = dict(metrics)
    for name in reported_metrics(num_levels, num_heads):
        out.setdefault(name, math.nan)
    return out


def _rank(name: str) -> tuple[int, int, int, str]:
    if name == EPOCH_KEY:
        return (0, 0, 0, "")
    m = lookup(name)
    if m is None:
        return (3, 0, 0, name)
    if name == m.name:
        return (1, REGISTRY.index(m), 0, "")
    return (2, REGISTRY.index(m), int(name.rsplit("_", 1)[1]), "")


def ordered(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` in one fixed key order: the epoch, whole-run metrics in registry order, per-level
    metrics by metric then level, anything unregistered last (sorted)."""
    return {k: metrics[k] for k in sorted(metrics, key=_rank)}


def describe(names: Iterable[str] | None = None) -> list[tuple[str, str, str, str]]:
    """(name, direction, unit, doc) rows for ``names`` (default: the whole registry)."""
    rows = []
    for n in names if names is not None else [m.name for m in REGISTRY]:
        m = lookup(n)
        if m is not None:
            rows.append((n, m.direction, m.unit, m.doc))
    return rows
