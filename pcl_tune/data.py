"""Datasets: the embedded "digit scenes" default, image folders, CIFAR-10/100 and mini-ImageNet.

Every dataset yields ``(index, image, label)`` with ``image`` a uint8 (3, S, S) tensor at the
dataset's load size; augmentation runs afterwards on whole batches (:mod:`pcl_tune.augment`).
``label`` is -1 where a split has no labels.

File datasets small enough (``data.cache_mb``) are decoded once, the first time a split is read,
and kept in memory (:func:`cache_file_datasets`): no epoch or pass decodes a file twice.

Splits: ``train`` (pretraining and the kNN bank), ``val`` (held-out, labelled: the search
objective), ``test`` (never touched by the search), and for mini-ImageNet ``fewshot`` (the 16
validation classes, for N-way K-shot episodes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class UnreadableImageError(OSError):
    """A dataset image file that cannot be decoded; the message is one line naming the file."""


def _one_line(e: BaseException) -> str:
    """The message of an :class:`UnreadableImageError`, also when a DataLoader worker raised it
    (torch re-raises it with the worker's traceback in the message: its last line is the message)."""
    line = (str(e).strip().splitlines() or [""])[-1]
    head, sep, rest = line.partition("UnreadableImageError: ")
    return rest if sep and " " not in head else line


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor.

    Args:
        images: (N, 3, S, S) uint8.
        labels: (N,) long; -1 for unlabelled.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[int, Tensor, int]:
        return i, self.images[i], int(self.labels[i])

    def subset(self, indices: Tensor | np.ndarray) -> TensorImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(self.images[idx], self.labels[idx])


class FileImageDataset(Dataset):
    """Images read from files, resized (shorter side) and centre-cropped to ``load_size``.

    With ``cache``, the first :func:`iterate_batches` over the dataset decodes every file once
    (:meth:`decode_all`) and keeps the uint8 images; from then on batches are sliced from memory,
    bit-identical to decoding the files again.

    Args:
        samples: list of (path, label).
        load_size: side of the square uint8 image returned.
        cache: keep the decoded images once they have been decoded (see :func:`cache_file_datasets`).
    """

    def __init__(self, samples: list[tuple[str, int]], load_size: int, *, cache: bool = False) -> None:
        self.samples = samples
        self.load_size = load_size
        self.labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        self.cache = cache
        self.decoded: Tensor | None = None
        """(N, 3, load_size, load_size) uint8 once :meth:`decode_all` has run, else None."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers under spawn: a lock does not pickle
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def decoded_bytes(self) -> int:
        """Memory the decoded images take: 3 x load_size^2 bytes each."""
        return len(self) * 3 * self.load_size ** 2

    def decode_all(self, num_workers: int = 0) -> Tensor:
        """Decode every file once (in ``num_workers`` processes) and keep the images; returns them,
        (N, 3, load_size, load_size) uint8, row i for sample i. An unreadable file raises
        :class:`UnreadableImageError`, as reading it one by one does."""
        with self._lock:  # trials sharing the process's dataset (direct executor threads) decode once
            if self.decoded is None:
                out = torch.empty((len(self), 3, self.load_size, self.load_size), dtype=torch.uint8)
                for b, images, _ in _load_files(self, torch.arange(len(self)), 256, num_workers):
                    out[b] = images
                self.decoded = out
            return self.decoded

    def __getitem__(self, i: int) -> tuple[int, Tensor, int]:
        from PIL import Image

        if self.decoded is not None:
            return i, self.decoded[i], int(self.labels[i])
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.load_size / min(w, h)
                nw, nh = max(self.load_size, round(w * scale)), max(self.load_size, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - self.load_size) // 2, (nh - self.load_size) // 2
                im = im.crop((left, top, left + self.load_size, top + self.load_size))
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for a damaged file
            first = (str(e).strip().splitlines() or [""])[0]
            raise UnreadableImageError(f"{path}: not a readable image ({type(e).__name__}: {first}); "
                                       "replace or remove the file") from None
        return i, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label

    def subset(self, indices: Tensor | np.ndarray) -> FileImageDataset:
        """The samples at ``indices`` (renumbered from 0); keeps ``cache``, and the decoded images if any."""
        out = FileImageDataset([self.samples[int(i)] for i in indices], self.load_size, cache=self.cache)
        if self.decoded is not None:
            out.decoded = self.decoded[torch.as_tensor(indices, dtype=torch.long)]
        return out


ImageDataset = TensorImageDataset | FileImageDataset


@dataclass
class DatasetSplits:
    """The splits of one dataset and what the model needs to know about them."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fewshot: ImageDataset | None = None

    def summary(self) -> str:
        parts = [f"train {len(self.train)}", f"val {len(self.val)}"]
        if self.test is not None:
            parts.append(f"test {len(self.test)}")
        if self.fewshot is not None:
            parts.append(f"fewshot {len(self.fewshot)}")
        return f"{self.name}: {', '.join(parts)} images, {self.num_classes} classes, {self.image_size} px"


def iterate_batches(
    dataset: ImageDataset, indices: Tensor | None, batch_size: int, *, num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(index (b,), images uint8 (b, 3, S, S), labels (b,))`` over ``indices`` in order.

    In-memory datasets are sliced directly (no per-sample Python work), and so are cached file
    datasets once decoded (the first call decodes all of it: :meth:`FileImageDataset.decode_all`);
    other file datasets go through a DataLoader with ``num_workers`` decoding processes.
    """
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    images: Tensor | None = None
    if isinstance(dataset, TensorImageDataset):
        images = dataset.images
    elif dataset.cache or dataset.decoded is not None:
        images = dataset.decode_all(num_workers)
    if images is not None:
        for start in range(0, idx.numel(), batch_size):
            b = idx[start:start + batch_size]
            yield b, images[b], dataset.labels[b]
        return
    yield from _load_files(dataset, idx, batch_size, num_workers)


def _load_files(dataset: FileImageDataset, idx: Tensor, batch_size: int,
                num_workers: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """:func:`iterate_batches` of a file dataset, decoding every file read (a DataLoader)."""
    loader = DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, persistent_workers=False)
    try:
        for b, images, labels in loader:
            yield b.long(), images, labels.long()
    except UnreadableImageError as e:  # from a worker: its traceback is in the message
        raise UnreadableImageError(_one_line(e)) from None


# --------------------------------------------------------------------------- digit scenes

DIGITS_SIZE = 16
"""Side of the digit scenes unless ``data.image_size`` says otherwise: at 16 px an epoch is 3x
faster than at 32 px and the encoder learned as well (benchmarks/README.md)."""


def _split_by_source(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """Stratified split of source indices into train/val/test by the given fractions."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        rng.shuffle(ids)
        n_val = int(round(fractions[1] * len(ids)))
        n_test = int(round(fractions[2] * len(ids)))
        parts[1].extend(ids[:n_val])
        parts[2].extend(ids[n_val:n_val + n_test])
        parts[0].extend(ids[n_val + n_test:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def render_digit_scenes(digits: Tensor, *, size: int = DIGITS_SIZE, seed: int = 0, clutter: int = 0, noise: float = 0.15,
                        scale: tuple[float, float] = (0.45, 0.8), shift: float = 1.0, rotation: float = 0.3) -> Tensor:
    """Composite 8x8 digit glyphs into cluttered RGB scenes, deterministically from ``seed``.

    Each scene: a dark background with a faint tint, gradient and pixel noise, ``clutter`` thin
    random strokes, and the light digit scaled to ``scale`` of the canvas side, rotated by up to
    ``rotation`` radians, placed anywhere it fits (``shift`` = 1: the whole free margin). Raw
    pixels fail on the geometry (42 % kNN at 16 px); the encoder must learn the invariances that
    random crops teach.

    Args:
        digits: (N, 8, 8) float glyph intensities in [0, 1].

    Returns:
        (N, 3, size, size) uint8 scenes.
    """
    n = digits.shape[0]
    g = torch.Generator().manual_seed(seed)

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    # Background: dark grey with a faint tint, a gentle gradient and pixel noise. Scene-wide colour
    # is kept weak on purpose: a strong random colour per scene is a cue that colour jitter cannot
    # remove, and instance discrimination then learns colour instead of shape (measured: kNN at
    # chance after 3 000 steps with random-colour scenes).
    grey = u(n, 1, 1, 1, lo=0.0, hi=0.4)
    tint = 0.03 * torch.randn(n, 3, 1, 1, generator=g)
    ang = u(n, lo=0, hi=2 * np.pi)
    t = (torch.cos(ang)[:, None, None] * xx + torch.sin(ang)[:, None, None] * yy) * 0.05  # (n, S, S)
    bg = grey + tint + t[:, None]
    # Clutter: thin, half-transparent strokes in random colours.
    for _ in range(clutter):
        p0, p1 = u(n, 2, lo=-1, hi=1), u(n, 2, lo=-1, hi=1)
        d = p1 - p0
        px = torch.stack([xx, yy], dim=-1)[None] - p0[:, None, None, :]  # (n, S, S, 2)
        tt = ((px * d[:, None, None, :]).sum(-1) / (d * d).sum(-1).clamp_min(1e-6)[:, None, None]).clamp(0, 1)
        dist = (px - tt[..., None] * d[:, None, None, :]).norm(dim=-1)
        width = u(n, lo=0.02, hi=0.05)[:, None, None]
        alpha = 0.6 * (1 - dist / width).clamp(0, 1)[:, None]
        bg = bg * (1 - alpha) + u(n, 3, 1, 1) * alpha
    # The digit: scale, rotate, translate with one batched affine warp.
    sc = u(n, lo=scale[0], hi=scale[1])
    rot = u(n, lo=-rotation, hi=rotation)
    max_shift = shift * (1 - sc)
    tx, ty = u(n, lo=-1, hi=1) * max_shift, u(n, lo=-1, hi=1) * max_shift
    cos, sin = torch.cos(rot) / sc, torch.sin(rot) / sc
    theta = torch.stack([torch.stack([cos, -sin, -(cos * tx - sin * ty)], 1),
                         torch.stack([sin, cos, -(sin * tx + cos * ty)], 1)], 1)  # output -> glyph coords
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    alpha = F.grid_sample(digits[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = alpha.clamp(0, 1)
    # Foreground: light grey with a faint tint.
    fg = (u(n, 1, 1, 1, lo=0.6, hi=1.0) + 0.04 * torch.randn(n, 3, 1, 1, generator=g)).clamp(0, 1)
    img = bg * (1 - alpha) + fg * alpha
    img = img + noise * torch.randn(n, 3, size, size, generator=g)  # sensor noise over the whole scene
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


DIGITS_FRACTIONS = (0.6, 0.2, 0.2)
"""Train / val / test shares of the digit glyphs (split by source glyph)."""


def digit_scenes(
    *, seed: int = 0, size: int = DIGITS_SIZE, copies: tuple[int, int, int] | None = None,
    fractions: tuple[float, float, float] = DIGITS_FRACTIONS, clutter: int = 0,
) -> DatasetSplits:
    """The embedded default dataset, built from scikit-learn's bundled handwritten digits.

    The 1 797 source glyphs are split train/val/test by source image (stratified, ``fractions``),
    so no glyph appears in two splits; each glyph is rendered into ``copies[split]`` scenes
    (default: ``data.digits_copies`` of :class:`pcl_tune.config.DataConfig`).
    """
    from sklearn.datasets import load_digits

    from .config import DataConfig

    if copies is None:
        copies = tuple(DataConfig().digits_copies)  # type: ignore[assignment]
    bunch = load_digits()
    glyphs = torch.from_numpy(bunch.images / 16.0).float()
    targets = np.asarray(bunch.target, dtype=np.int64)
    splits = _split_by_source(targets, fractions, seed)
    out = []
    for s, (ids, reps) in enumerate(zip(splits, copies)):
        src = np.repeat(ids, reps)
        scenes = render_digit_scenes(glyphs[src], size=size, seed=seed * 1000 + 17 * s + 1, clutter=clutter)
        out.append(TensorImageDataset(scenes, torch.from_numpy(targets[src])))
    mean = tuple(float(v) for v in out[0].images.float().div(255).mean((0, 2, 3)))
    std = tuple(float(v) for v in out[0].images.float().div(255).std((0, 2, 3)))
    return DatasetSplits("digits", out[0], out[1], out[2], 10, size, mean, std)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- folders, CIFAR, mini-ImageNet

def scan_image_folder(root: str | os.PathLike[str], classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of an ImageFolder layout ``root/<class>/<image>``, classes sorted."""
    root = Path(root)
    classes = _class_folders(root) if classes is None else classes
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise FileNotFoundError(_no_images(root))
    return samples, classes


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<images>)")
    return classes


def _no_images(root: Path) -> str:
    return f"image folder {root} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}"


def _folder_layout(base: Path) -> str:
    return f"image folder dataset {base}: expected {base}/train/<class>/<images> (and optionally {base}/val, {base}/test)"


def _mini_imagenet_layout(base: Path, part: str) -> str:
    return (f"mini-ImageNet root {base}: missing {base}/{part}/<class>/<images> "
            "(expected the 64/16/20 class split as train/val/test folders)")


def check_dataset(cfg: TrainConfig) -> None:
    """Whether a config's dataset files are where it says, cheaply: the folder layout and one image
    per split, nothing decoded or fully scanned. Raises FileNotFoundError (one line) as loading would."""
    d = cfg.data
    if d.dataset == "digits":
        return
    base = Path(d.root or ".")
    if d.dataset in ("cifar10", "cifar100"):
        folder = base / ("cifar-10-batches-py" if d.dataset == "cifar10" else "cifar-100-python")
        if not d.download and not folder.is_dir():
            raise FileNotFoundError(f"{d.dataset} not found under {str(base)!r} (no {folder.name} folder); set "
                                    "data.download: true to fetch it")
        return
    parts = ("train", "val", "test") if d.dataset == "miniimagenet" else ("train",)
    for part in parts:
        if not (base / part).is_dir():
            raise FileNotFoundError(_mini_imagenet_layout(base, part) if d.dataset == "miniimagenet"
                                    else _folder_layout(base))
        root = base / part
        found = any(f.lower().endswith(IMAGE_EXTENSIONS) for c in _class_folders(root)
                    for _, _, files in os.walk(root / c) for f in files)
        if not found:
            raise FileNotFoundError(_no_images(root))


def _holdout(labels: Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index split with at least one held-out sample per class."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    lab = labels.numpy()
    for c in np.unique(lab):
        ids = np.flatnonzero(lab == c)
        rng.shuffle(ids)
        n = max(1, int(round(fraction * len(ids)))) if len(ids) > 1 else 0
        held.extend(ids[:n])
        keep.extend(ids[n:])
    return np.sort(np.asarray(keep, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def image_folder(root: str, *, image_size: int, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """``root/train/<class>/*`` plus optional ``root/val`` and ``root/test`` in the same layout.

    Without ``root/val``, a stratified ``val_fraction`` of train is held out as val.
    """
    base = Path(root)
    if not (base / "train").is_dir():
        raise FileNotFoundError(_folder_layout(base))
    train_samples, classes = scan_image_folder(base / "train")
    train = FileImageDataset(train_samples, image_size)
    if (base / "val").is_dir():
        val = FileImageDataset(scan_image_folder(base / "val", classes)[0], image_size)
    else:
        keep, held = _holdout(train.labels, val_fraction, seed)
        train, val = train.subset(keep), train.subset(held)
    test = FileImageDataset(scan_image_folder(base / "test", classes)[0], image_size) if (base / "test").is_dir() else None
    return DatasetSplits("folder", train, val, test, len(classes), image_size, IMAGENET_MEAN, IMAGENET_STD)


def cifar(root: str, *, num_classes: int = 10, download: bool = False, val_fraction: float = 0.1,
          seed: int = 0) -> DatasetSplits:
    """CIFAR-10/100 through torchvision; val is a stratified hold-out of the official train set."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"CIFAR-{num_classes} not found under {root!r}; set data.download: true to fetch "
                                f"it ({e})") from None

    def to_ds(ds: object) -> TensorImageDataset:
        imgs = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # type: ignore[attr-defined]
        return TensorImageDataset(imgs, torch.as_tensor(ds.targets, dtype=torch.long))  # type: ignore[attr-defined]

    train_all, test = to_ds(tr), to_ds(te)
    keep, held = _holdout(train_all.labels, val_fraction, seed)
    mean = (0.4914, 0.4822, 0.4465) if num_classes == 10 else (0.5071, 0.4865, 0.4409)
    std = (0.2470, 0.2435, 0.2616) if num_classes == 10 else (0.2673, 0.2564, 0.2762)
    return DatasetSplits(f"cifar{num_classes}", train_all.subset(keep), train_all.subset(held), test,
                         num_classes, 32, mean, std)


def mini_imagenet(root: str, *, image_size: int = 84, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """mini-ImageNet from ``root/{train,val,test}/<class>/*`` (64 / 16 / 20 classes, 84 px).

    Pretraining uses the 64 train classes; ``val`` (the kNN / probe objective) is a held-out
    fraction of their images; the 16 val classes form the ``fewshot`` split for N-way K-shot
    episodes; the 20 test classes are never used by the search.
    """
    base = Path(root)
    for part in ("train", "val", "test"):
        if not (base / part).is_dir():
            raise FileNotFoundError(_mini_imagenet_layout(base, part))
    train_samples, classes = scan_image_folder(base / "train")
    full = FileImageDataset(train_samples, image_size)
    keep, held = _holdout(full.labels, val_fraction, seed)
    fewshot = FileImageDataset(scan_image_folder(base / "val")[0], image_size)
    test = FileImageDataset(scan_image_folder(base / "test")[0], image_size)
    if len(classes) != 64:
        log.warning("mini-ImageNet at %s has %d train classes (the standard split has 64)", base, len(classes))
    return DatasetSplits("miniimagenet", full.subset(keep), full.subset(held), test, len(classes), image_size,
                         IMAGENET_MEAN, IMAGENET_STD, fewshot=fewshot)


# --------------------------------------------------------------------------- a config's datasets

# Augmentation settings a config leaves unset (None) take MoCo v2's values, or the dataset's own
# where MoCo v2's were measured to hurt it (digits: crops that cut the digit, mirrored digits).
AUGMENT_DEFAULTS: dict[str, dict[str, float]] = {
    "moco_v2": {"crop_min_scale": 0.2, "flip_p": 0.5},
    "digits": {"crop_min_scale": 0.5, "flip_p": 0.0},
}


def augment_setting(cfg: TrainConfig, name: str) -> float:
    """A ``data.<name>`` augmentation setting; when unset, the dataset's default or MoCo v2's."""
    value = getattr(cfg.data, name)
    if value is not None:
        return float(value)
    return AUGMENT_DEFAULTS.get(cfg.data.dataset, {}).get(name, AUGMENT_DEFAULTS["moco_v2"][name])


def cache_file_datasets(splits: DatasetSplits, limit_mb: float) -> bool:
    """Mark every file split of ``splits`` to be kept decoded in memory (``FileImageDataset.cache``)
    when all its splits together, decoded at load size, take at most ``limit_mb`` MB (``data.cache_mb``).

    Nothing is decoded here: a split is decoded the first time it is read, so a split a run never
    reads (the test split, during pretraining) costs no memory. Returns whether the cache is on.
    """
    parts = [s for s in (splits.train, splits.val, splits.test, splits.fewshot) if isinstance(s, FileImageDataset)]
    on = bool(parts) and limit_mb > 0 and sum(s.decoded_bytes() for s in parts) <= limit_mb * 2**20
    for s in parts:
        s.cache = on
    if parts:
        log.info("%s: decoded images %s in memory (%.0f MB of data.cache_mb %s)", splits.name,
                 "kept" if on else "not kept", sum(s.decoded_bytes() for s in parts) / 2**20, limit_mb)
    return on


_DATA_CACHE: dict[tuple[Any, ...], DatasetSplits] = {}


def load_datasets(cfg: TrainConfig) -> DatasetSplits:
    """Build (and cache per process) the dataset splits a config asks for."""
    dc = cfg.data
    key = (dc.dataset, dc.root, dc.image_size, dc.load_size, dc.val_fraction, tuple(dc.digits_copies), cfg.seed,
           dc.download, dc.digits_clutter, dc.cache_mb)
    if key in _DATA_CACHE:
        splits = _DATA_CACHE[key]
    else:
        if dc.dataset == "digits":
            splits = digit_scenes(seed=cfg.seed, size=dc.image_size or DIGITS_SIZE,
                                  copies=tuple(dc.digits_copies), clutter=dc.digits_clutter)  # type: ignore[arg-type]
        elif dc.dataset in ("cifar10", "cifar100"):
            splits = cifar(dc.root or ".", num_classes=10 if dc.dataset == "cifar10" else 100,
                           download=dc.download, val_fraction=dc.val_fraction, seed=cfg.seed)
        elif dc.dataset == "miniimagenet":
            size = dc.image_size or 84
            splits = mini_imagenet(dc.root or ".", image_size=dc.load_size or size, val_fraction=dc.val_fraction,
                                   seed=cfg.seed)
            splits.image_size = size
        else:
            size = dc.image_size or 224
            splits = image_folder(dc.root or ".", image_size=dc.load_size or round(size * 8 / 7),
                                  val_fraction=dc.val_fraction, seed=cfg.seed)
            splits.image_size = size
        cache_file_datasets(splits, dc.cache_mb)
        _DATA_CACHE[key] = splits
    if dc.subset is not None and dc.subset < len(splits.train):
        splits = DatasetSplits(splits.name, splits.train.subset(np.arange(dc.subset)), splits.val, splits.test,
                               splits.num_classes, splits.image_size, splits.mean, splits.std, splits.fewshot)
    return splits


def train_size(cfg: TrainConfig) -> int | None:
    """Number of training images a config gives, without rendering or decoding them (None if unknown)."""
    d = cfg.data
    n: int | None = None
    if d.dataset == "digits":
        from sklearn.datasets import load_digits

        targets = np.asarray(load_digits().target)
        n = len(_split_by_source(targets, DIGITS_FRACTIONS, cfg.seed)[0]) * d.digits_copies[0]
    elif d.dataset in ("cifar10", "cifar100"):
        n = 45000
    if n is not None and d.subset is not None:
        n = min(n, d.subset)
    return n


def val_size(cfg: TrainConfig) -> int | None:
    """Number of validation images (the split the search's objective is measured on) a config gives,
    without rendering or decoding them (None if unknown). The analysis derives the objective's
    binomial standard error from it."""
    d = cfg.data
    if d.dataset == "digits":
        from sklearn.datasets import load_digits

        targets = np.asarray(load_digits().target)
        return len(_split_by_source(targets, DIGITS_FRACTIONS, cfg.seed)[1]) * d.digits_copies[1]
    if d.dataset in ("cifar10", "cifar100"):
        return int(round(50000 * d.val_fraction))
    return None
