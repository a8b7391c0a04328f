"""The typed configuration of one PCL pretraining run, with its defaults in one place.

A config is nested dataclasses; files and the command line address fields by dotted path
(``optim.lr``, ``pcl.k``). :func:`config_from_dict` accepts nested mappings, dotted keys, or
both, and rejects unknown keys and wrong types with a message that names the key, the value and
what was expected. All accuracies the loop reports are in percent.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what was expected."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-3`` (no dot) as a float, as people write it."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML with :class:`YamlLoader`; a syntax error becomes a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None


@dataclass
class DataConfig:
    dataset: str = "digits"
    """digits (embedded default) | folder | cifar10 | cifar100 | miniimagenet."""
    root: str | None = None
    """Dataset root for folder / cifar / miniimagenet."""
    download: bool = False
    """Allow torchvision to download CIFAR (never done implicitly)."""
    image_size: int | None = None
    """Training crop size; default: the dataset's (16 digits, 32 CIFAR, 84 mini-ImageNet, 224 folder).
    Digits render at this size; 16 px trains 3x faster than 32 px and learned as well (measured)."""
    load_size: int | None = None
    """Side images are decoded to before augmentation (file datasets); default: image_size * 8/7 for
    folders, image_size for mini-ImageNet (its images are 84 px)."""
    val_fraction: float = 0.1
    """Held-out fraction of train used as the labelled val split when the dataset has none."""
    num_workers: int = 2
    """Decoding processes for file datasets."""
    cache_mb: int = 512
    """File datasets (image folders, mini-ImageNet): when all their splits decoded at load size
    (3 x load_size^2 bytes per image) take at most this many MB, each split is decoded once, the
    first time it is read, and kept in memory as uint8, so later epochs and passes decode nothing
    (the batches are bit-identical to decoding every time). 0 turns the cache off."""
    digits_copies: list[int] = field(default_factory=lambda: [1, 1, 1])
    """digits: scenes rendered per source glyph in train / val / test. Keep train at 1: scenes of the
    same glyph are negatives of each other in instance discrimination, which then learns position
    and background instead of shape (measured: kNN 25 % with 3 copies vs 54 % with 1 at ~1 500 steps)."""
    digits_clutter: int = 0
    """digits: random strokes drawn behind each digit (a per-scene nuisance that augmentation cannot
    remove: instance discrimination latches onto it, so keep it low)."""
    subset: int | None = None
    """Use only the first N training images (smoke tests)."""
    crop_min_scale: float | None = None
    """Smallest area fraction of the random resized crop; default 0.2 (MoCo v2), 0.5 for digits
    (measured: 0.5 reached 40 % kNN after 900 steps where 0.3 reached 32 %)."""
    flip_p: float | None = None
    """Probability of a horizontal flip in the two views; default 0.5 (MoCo v2), 0 for digits,
    whose classes are not mirror-symmetric (a mirrored 2 is close to a 5)."""
    rotation: float = 0.0
    """Largest random rotation of each view, in radians (0: none, as MoCo v2). On digits, whose
    scenes are rotated by up to 0.3 rad, 0.3 measured level with 0 (51.8 vs 53.5 % kNN)."""


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"
    """small_cnn | resnet18 | resnet50."""
    width: int = 32
    """small_cnn base width (on the default, 32 reached 56 % kNN in 200 epochs where 16 reached 52 %)."""
    small_stem: bool = True
    """ResNet: 3x3 stride-1 stem without max-pool (for images below ~96 px)."""
    head: str = "mlp"
    """Projection head: linear | mlp | amcl (``num_heads`` MLP heads, each with its own queue, and a
    temperature per head and (query, key) pair: adaptive multi-head contrastive learning, Wang et
    al., ECCV 2024; METHOD.md)."""
    num_heads: int = 3
    """amcl: projection heads C."""
    temperature_range: list[float] = field(default_factory=lambda: [1e-5, 2.0])
    """amcl: [lo, hi] of every pair temperature (a scaled sigmoid keeps it inside)."""
    low_dim: int = 128
    """Embedding dimension."""
    queue_size: int = 256
    """MoCo queue length Q (independent of batch size and of pcl.num_negatives); keep it well below
    the number of training images, or the queue holds stale keys of the query's own image."""
    momentum: float = 0.99
    """Key-encoder EMA momentum."""
    bn_splits: int = 1
    """Key encoder runs on this many shuffled sub-batches, so batch-norm statistics cannot leak
    which key is the query's positive (MoCo's shuffle-BN, in one process). Off (1) by default: on
    the embedded default, 4 splits of 16 images made the statistics noisy and learning slower."""
    key_bn: str = "own"
    """Where the key encoder's batch-norm running statistics come from: ``own`` (its own forward
    passes, as MoCo and PCL: only weights are averaged), ``ema`` (an EMA of the query encoder's at
    ``momentum``, on top of its own passes) or ``query`` (copied from the query encoder every step,
    this project's first behaviour). On the embedded default the three are not told apart by 5
    seeds (benchmarks/README.md, "Key-encoder batch-norm statistics"); ``own`` is the method's."""


@dataclass
class OptimConfig:
    lr: float = 0.01
    """Peak learning rate (0.01 at batch 64 is MoCo's 0.03 at 256 scaled linearly; the demo search
    preferred 0.01-0.015 over 0.03-0.3 on the embedded default)."""
    batch_size: int = 64
    """Global batch: the images of one training step, split evenly across the DDP workers of a
    Ray Train trial (it must divide by their number). ``lr`` is the learning rate of this batch
    whatever the number of workers; when you change the batch, scale ``lr`` with it (the linear
    rule of Goyal et al. 2017, which MoCo's 0.03 at 256 follows)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    """cosine | step (lr x0.1 at each epoch in lr_steps)."""
    lr_steps: list[int] = field(default_factory=list)


@dataclass
class PCLConfig:
    temperature: float = 0.07
    """InfoNCE temperature (0.07 reached 52 % kNN on the default where 0.2 reached 37 %)."""
    proto_temperature: float = 0.2
    """Mean concentration phi of every clustering level (PCL's temperature)."""
    warmup_epochs: int = 20
    """Epochs of InfoNCE only before clustering starts (reference: 20)."""
    cluster_schedule: Any = "5,10"
    """Cluster counts per level and epoch; see pcl_tune.clustering.ClusterSchedule."""
    proto_loss: str = "proto_nce"
    """proto_nce | topk | topk_below (top-K for levels with fewer than topk_threshold clusters)."""
    topk_threshold: int | None = None
    """For topk_below; default: optim.batch_size."""
    num_negatives: int = 1024
    """r, negative prototypes per level (clamped to what exists)."""
    duplicates: str = "dedupe"
    """ProtoNCE duplicate positives: dedupe (correct) | remap (the report's fix) | none (reference)."""
    k: int = 3
    """Top-K: prototypes pulled."""
    lam: float = 0.1
    """Top-K: push weight lambda."""
    alpha: float = 1.0
    """Top-K: push margin on the squared distance, in (0, 4]."""
    weighting: str = "inverse_distance"
    """Top-K pull weights: inverse_distance | uniform | softmax."""
    push_reduction: str = "sum"
    """Top-K push term: sum (the report) | mean."""
    proto_weight: float = 1.0
    """Weight of the mean prototype loss added to InfoNCE."""
    amcl_beta: float = 0.1
    """model.head amcl: weight of the temperature penalty (pcl_tune.losses.temperature_penalty,
    zero at ``pcl.temperature``)."""
    proto_head: Any = 0
    """model.head amcl: the head whose embeddings are clustered and take the prototype loss (an
    index), or ``all``: each head clustered on its own and the prototype loss averaged over the
    heads (clustering costs ``num_heads`` times as much)."""


@dataclass
class ClusteringConfig:
    backend: str = "auto"
    """auto | faiss | faiss-gpu | torch."""
    niter: int = 20
    nredo: int = 1
    """k-means restarts per level, best objective kept. The reference PCL code uses 5
    (imagenet_pcl.yaml does); on the embedded default 5 restarts cost 0.043 s per epoch against
    0.010 s for 1, a quarter of the epoch's clustering + feature budget, for clusters that are
    recomputed next epoch anyway."""
    max_points_per_centroid: int = 1000
    min_points_per_centroid: int = 10
    features: str = "bank"
    """What k-means clusters at the start of each epoch after warm-up: ``bank`` (the default: a memory
    bank of the key embeddings the training steps computed, one row per train image, as
    DeepCluster-v2: no pass; images no step has seen yet are embedded by a pass over just them) or
    ``pass`` (the reference: the momentum encoder's head embeddings of the eval view of every train
    image, from a pass over the train set, which an evaluated epoch shares with its kNN bank);
    METHOD.md §2. ``bank`` measured no worse on the embedded default (demo settings, 60 epochs, 3
    paired seeds): NMI +0.039 [+0.024, +0.053] and kNN +2.1 [-5.1, +9.4] points (not resolved).
    With every epoch evaluated (eval.every 1, as a search needs) the time per epoch is the same:
    the kNN bank still needs its pass; with eval.every > 1 the unevaluated epochs make no pass."""


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    """kNN: neighbours and temperature of the similarity weights exp(s / t)."""
    encoder: str = "key"
    """Encoder whose backbone features are judged: key (momentum; shares the clustering pass) | query."""
    batch_size: int = 256
    every: int = 1
    """Evaluate every N epochs (and always at the last)."""
    best_metric: str = "knn_top1"
    """Metric whose best epoch is kept as ``checkpoint/best.pt`` beside the latest checkpoint (the
    search sets it to its objective); direction from pcl_tune.metrics."""
    fewshot_episodes: int = 200
    """Episodes of the per-epoch few-shot metrics fewshot_5w1s / fewshot_5w5s (5-way, 15 queries per
    class, nearest-class-mean classifier on the val split's backbone features); 0 turns them off."""


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)."""
    threads: int | None = None
    """torch.set_num_threads for this process; default: leave torch's choice."""
    progress: bool = True
    """Print a progress line during epochs."""
    checkpoint_every: int = 1
    """In a search: hand the run's checkpoint to Ray Tune / Ray Train with every N-th epoch's report
    (and always the last epoch's); the other epochs report metrics only. The run still writes its
    local checkpoint every epoch. A resumed trial goes on from the last checkpoint handed over, so
    it may repeat up to N-1 epochs. Plain runs ignore it."""
    inject_nan_epoch: int | None = None
    """Testing only: rank 0's loss is NaN from the first step of this epoch (1-based), so a test
    can check how a diverged run is reported. Leave null."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pcl: PCLConfig = field(default_factory=PCLConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view: {'optim.lr': 0.06, ...}."""
        return flatten(self.to_dict())


SECTIONS = {f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(d: dict[str, Any]) -> dict[str, Any]:
    """Expand dotted keys into nested dicts; nested and dotted forms may be mixed."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in SECTIONS:
            v = unflatten(v)
        parts = str(k).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"key {k!r}: {p!r} is a value, not a section")
        last = parts[-1]
        if len(parts) == 1 and last in SECTIONS and isinstance(v, dict) and isinstance(node.get(last), dict):
            node[last].update(v)
        else:
            node[last] = v
    return out


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {path + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint}; expected one of: {', '.join(path + n for n in names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"key {full!r}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        kwargs[key] = coerced
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested and/or dotted keys."""
    cfg = _build(TrainConfig, unflatten(dict(data or {})), "")
    validate(cfg)
    return cfg


_CHOICES = {
    "data.dataset": ("digits", "folder", "cifar10", "cifar100", "miniimagenet"),
    "model.backbone": ("small_cnn", "resnet18", "resnet50"),
    "model.head": ("linear", "mlp", "amcl"),
    "model.key_bn": ("own", "ema", "query"),
    "optim.schedule": ("cosine", "step"),
    "pcl.proto_loss": ("proto_nce", "topk", "topk_below"),
    "pcl.duplicates": ("dedupe", "remap", "none"),
    "pcl.weighting": ("inverse_distance", "uniform", "softmax"),
    "pcl.push_reduction": ("sum", "mean"),
    "clustering.backend": ("auto", "faiss", "faiss-gpu", "torch"),
    "clustering.features": ("pass", "bank"),
    "eval.encoder": ("key", "query"),
}
_POSITIVE = ("epochs", "optim.lr", "optim.batch_size", "model.low_dim", "model.queue_size", "model.width",
             "pcl.temperature", "pcl.proto_temperature", "pcl.k", "pcl.alpha", "clustering.niter",
             "clustering.nredo", "eval.knn_k", "eval.knn_t", "eval.batch_size", "eval.every")
_NON_NEGATIVE = ("eval.fewshot_episodes", "pcl.warmup_epochs", "pcl.num_negatives", "pcl.lam", "pcl.proto_weight", "optim.weight_decay",
                 "optim.momentum", "data.num_workers", "data.cache_mb")


def validate(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express; raises :class:`ConfigError`."""
    from .clustering import ClusterSchedule

    flat = cfg.flat()
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"key {key!r}: got {flat[key]!r}, expected one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"key {key!r}: got {flat[key]!r}, expected a value > 0")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"key {key!r}: got {flat[key]!r}, expected a value >= 0")
    for key in ("data.subset", "data.image_size", "data.load_size", "pcl.topk_threshold", "inject_nan_epoch"):
        if flat[key] is not None and flat[key] < 1:
            raise ConfigError(f"key {key!r}: got {flat[key]!r}, expected an integer >= 1 (or null)")
    if cfg.checkpoint_every < 1:
        raise ConfigError(f"key 'checkpoint_every': got {cfg.checkpoint_every!r}, expected an integer >= 1 "
                          "(hand a checkpoint to Ray every N epochs)")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"key 'data.val_fraction': got {cfg.data.val_fraction!r}, expected a value in [0, 1)")
    if not 0 <= cfg.data.rotation <= 3.15:
        raise ConfigError(f"key 'data.rotation': got {cfg.data.rotation!r}, expected radians in [0, 3.15]")
    if cfg.data.flip_p is not None and not 0 <= cfg.data.flip_p <= 1:
        raise ConfigError(f"key 'data.flip_p': got {cfg.data.flip_p!r}, expected a probability in [0, 1]")
    if cfg.data.crop_min_scale is not None and not 0 < cfg.data.crop_min_scale <= 1:
        raise ConfigError(f"key 'data.crop_min_scale': got {cfg.data.crop_min_scale!r}, expected a value in (0, 1]")
    if cfg.model.bn_splits < 1:
        raise ConfigError(f"key 'model.bn_splits': got {cfg.model.bn_splits!r}, expected an integer >= 1")
    if not 0 <= cfg.model.momentum < 1:
        raise ConfigError(f"key 'model.momentum': got {cfg.model.momentum!r}, expected a value in [0, 1)")
    _validate_amcl(cfg)
    if not 0 < cfg.pcl.alpha <= 4:
        raise ConfigError(f"key 'pcl.alpha': got {cfg.pcl.alpha!r}, expected a value in (0, 4] "
                          "(a squared distance between unit vectors)")
    try:
        ClusterSchedule.parse(cfg.pcl.cluster_schedule, what="key 'pcl.cluster_schedule'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from .metrics import REGISTRY, lookup

    if lookup(cfg.eval.best_metric) is None:
        raise ConfigError(f"key 'eval.best_metric': got {cfg.eval.best_metric!r}, expected a reported metric: "
                          f"{', '.join(m.name for m in REGISTRY)} (or a per-level name such as acc_proto_0)")
    if cfg.data.dataset != "digits" and not cfg.data.root:
        raise ConfigError(f"key 'data.root': dataset {cfg.data.dataset!r} needs a root folder")
    if len(cfg.data.digits_copies) != 3 or min(cfg.data.digits_copies) < 1:
        raise ConfigError(f"key 'data.digits_copies': got {cfg.data.digits_copies!r}, expected three integers >= 1")


def _validate_amcl(cfg: TrainConfig) -> None:
    m, p = cfg.model, cfg.pcl
    if m.num_heads < 1:
        raise ConfigError(f"key 'model.num_heads': got {m.num_heads!r}, expected an integer >= 1")
    rng = m.temperature_range
    if len(rng) != 2 or not 0 < rng[0] < rng[1]:
        raise ConfigError(f"key 'model.temperature_range': got {rng!r}, expected [lo, hi] with 0 < lo < hi")
    if p.amcl_beta < 0:
        raise ConfigError(f"key 'pcl.amcl_beta': got {p.amcl_beta!r}, expected a value >= 0")
    head = p.proto_head
    if head != "all" and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < m.num_heads):
        raise ConfigError(f"key 'pcl.proto_head': got {head!r}, expected a head index in [0, {m.num_heads - 1}] "
                          "(model.num_heads) or 'all'")
    if m.head == "amcl" and not rng[0] < p.temperature < rng[1]:
        raise ConfigError(f"key 'pcl.temperature': got {p.temperature!r}, expected a value inside "
                          f"model.temperature_range {rng!r} (model.head amcl starts every pair there)")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a run config or a search-space file as a plain dict of (nested) settings.

    A search-space file (it has a top-level ``search`` or ``fixed`` key) contributes its
    ``fixed`` settings; searched parameters keep their defaults.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    data = read_yaml(p.read_text(), str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    if "search" in data or "fixed" in data:
        return dict(data.get("fixed") or {})
    return data


def unwritable_reason(path: str | os.PathLike[str], *, folder: bool) -> str | None:
    """Why ``path`` (a folder to create or fill when ``folder``, else a file to write) cannot be
    written, or None; creates nothing. A command checks its outputs with it before it starts work."""
    p = Path(path).expanduser().absolute()
    if p.exists() and p.is_dir() != folder:
        return f"{p} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
    target = p if p.exists() and folder else p.parent
    while not target.exists() and target.parent != target:  # the nearest existing ancestor
        target = target.parent
    if not target.is_dir():
        return f"{target} is a file, not a folder"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} is not writable"
    if p.exists() and not folder and not os.access(p, os.W_OK):
        return f"{p} is not writable"
    return None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "pcl.cluster_schedule=5,10"]`` -> dotted dict, values read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
        key, raw = item.split("=", 1)
        value = read_yaml(raw, f"--set {item!r}") if raw.strip() else None
        out[key.strip()] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two (nested or dotted) config dicts; ``override`` wins."""
    a, b = unflatten(base), unflatten(override)

    out = dict(a)
    for k, v in b.items():
        # Only config sections merge key by key; a dict-valued setting (a cluster schedule such as
        # {steps: {...}}) is replaced whole.
        if k in SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every setting; used by docs and ``--help-config``."""
    import ast
    import inspect

    rows = []
    for section_cls, prefix in [(TrainConfig, "")] + [
        (typing.get_type_hints(TrainConfig)[s], s + ".") for s in sorted(SECTIONS)
    ]:
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(section_cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)  # type: ignore[attr-defined]
        hints = typing.get_type_hints(section_cls)
        default = section_cls()
        for f in dataclasses.fields(section_cls):
            if f.name in SECTIONS and prefix == "":
                continue
            rows.append((prefix + f.name, _type_name(hints[f.name]), getattr(default, f.name), docs.get(f.name, "")))
    return rows
