"""PASCAL VOC 2007 from its devkit layout, for the VOC07 low-shot evaluation (:mod:`pcl_tune.evaluate.voc07`).

Layout read (Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010)::

    <root>/JPEGImages/<id>.jpg
    <root>/Annotations/<id>.xml
    <root>/ImageSets/Main/trainval.txt     one image id per line
    <root>/ImageSets/Main/test.txt

``root`` may also be a folder holding ``VOC2007/`` or ``VOCdevkit/VOC2007/`` (how the tar files
unpack). Nothing is downloaded.

Targets follow VOC's classification convention, the one the low-shot SVMs expect: for image i
and class c, 1 if the image has at least one object of class c not marked difficult, -1 if all
its objects of class c are marked difficult (ignored in training and scoring), 0 otherwise.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import FileImageDataset

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The 20 VOC class names in the standard (alphabetical) order: column c of the targets is class c."""

SPLITS: tuple[str, ...] = ("trainval", "test")

# Where the devkit folder may sit relative to the ``root`` a user passes, tried in this order.
_CANDIDATES: tuple[str, ...] = (".", "VOC2007", os.path.join("VOCdevkit", "VOC2007"))
_PARTS: tuple[str, ...] = ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"))


@dataclass
class VOC2007:
    """The two VOC 2007 classification splits.

    ``trainval`` and ``test`` yield ``(index, image, -1)`` with ``image`` a uint8 (3, S, S)
    tensor; the multi-label targets are kept apart, row i belonging to image i of the split.
    """

    trainval: FileImageDataset
    test: FileImageDataset
    trainval_targets: np.ndarray  # (N, 20) int64 in {-1, 0, 1}
    test_targets: np.ndarray  # (M, 20) int64 in {-1, 0, 1}
    classes: tuple[str, ...]


def _layout(root: Path) -> str:
    return (f"expected {root}/JPEGImages/<id>.jpg, {root}/Annotations/<id>.xml and "
            f"{root}/ImageSets/Main/{{trainval,test}}.txt (or the same under {root}/VOC2007/ or "
            f"{root}/VOCdevkit/VOC2007/)")


def find_devkit(root: str | os.PathLike[str]) -> Path:
    """The folder holding ``JPEGImages/``, ``Annotations/`` and ``ImageSets/Main/``: ``root`` itself,
    ``root/VOC2007`` or ``root/VOCdevkit/VOC2007`` (the first that holds any of them)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"VOC2007 root {base} does not exist; {_layout(base)}")
    for rel in _CANDIDATES:
        folder = base / rel
        if any((folder / part).is_dir() for part in _PARTS):
            # A partial layout is reported by name rather than skipped for the next candidate.
            for part in _PARTS:
                if not (folder / part).is_dir():
                    raise FileNotFoundError(f"VOC2007 folder {folder} has no {part}/; {_layout(base)}")
            return folder if rel != "." else base
    raise FileNotFoundError(f"no VOC2007 devkit layout under {base}; {_layout(base)}")


def read_split(path: str | os.PathLike[str]) -> list[str]:
    """Image ids listed in one ``ImageSets/Main/<split>.txt``, one per line, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC2007 split file {path} does not exist (expected one image id per line)")
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if len(words) != 1:
            raise ValueError(f"{path}, line {n}: expected one image id, got {line.strip()!r}")
        ids.append(words[0])
    if not ids:
        raise ValueError(f"VOC2007 split file {path} lists no image ids")
    return ids


def read_annotation(path: str | os.PathLike[str]) -> list[tuple[str, bool]]:
    """(class name, difficult) of every ``<object>`` in one ``Annotations/<id>.xml``, in file order.

    A missing ``<difficult>`` counts as not difficult. Class names must be in :data:`VOC_CLASSES`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC2007 annotation {path} does not exist (expected Annotations/<id>.xml "
                                "for every image id in the split)")
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"VOC2007 annotation {path} is not valid XML: {e}") from None
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"VOC2007 annotation {path}: an <object> has no <name>")
        if name not in VOC_CLASSES:
            raise ValueError(f"VOC2007 annotation {path}: unknown class {name!r} "
                             "(expected one of the 20 VOC classes)")
        text = (obj.findtext("difficult") or "0").strip()
        if text not in ("0", "1"):
            raise ValueError(f"VOC2007 annotation {path}: <difficult> of a {name!r} is {text!r}, "
                             "expected 0 or 1")
        objects.append((name, text == "1"))
    return objects


def image_targets(objects: list[tuple[str, bool]]) -> np.ndarray:
    """(20,) int64 target of one image: 1 some object of the class is not difficult, -1 all of the
    class's objects are difficult, 0 the class is absent."""
    out = np.zeros(len(VOC_CLASSES), dtype=np.int64)
    for name, difficult in objects:
        c = VOC_CLASSES.index(name)
        if not difficult:
            out[c] = 1
        elif out[c] == 0:
            out[c] = -1
    return out


def _split(folder: Path, split: str, image_size: int) -> tuple[FileImageDataset, np.ndarray]:
    ids = read_split(folder / "ImageSets" / "Main" / f"{split}.txt")
    samples: list[tuple[str, int]] = []
    targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int64)
    for i, image_id in enumerate(ids):
        image = folder / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise FileNotFoundError(f"VOC2007 image {image} listed in {split}.txt does not exist "
                                    "(expected JPEGImages/<id>.jpg for every image id in the split)")
        samples.append((str(image), -1))
        targets[i] = image_targets(read_annotation(folder / "Annotations" / f"{image_id}.xml"))
    return FileImageDataset(samples, image_size), targets


def voc2007(root: str | os.PathLike[str], *, image_size: int) -> VOC2007:
    """Load the ``trainval`` and ``test`` splits of a VOC 2007 devkit folder.

    Args:
        root: the devkit folder, or a folder holding ``VOC2007/`` or ``VOCdevkit/VOC2007/``.
        image_size: S, the side images are resized (shorter side) and centre-cropped to.

    Returns:
        A :class:`VOC2007` whose datasets yield uint8 (3, S, S) images and whose targets are
        (N, 20) and (M, 20) int64 arrays in {-1, 0, 1}, columns in :data:`VOC_CLASSES` order.
    """
    folder = find_devkit(root)
    trainval, trainval_targets = _split(folder, "trainval", image_size)
    test, test_targets = _split(folder, "test", image_size)
    return VOC2007(trainval, test, trainval_targets, test_targets, VOC_CLASSES)
