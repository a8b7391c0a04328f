"""The VOC 2007 devkit loader on a tiny hand-written fixture."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcl_tune.data import FileImageDataset
from pcl_tune.voc2007 import VOC2007, VOC_CLASSES, read_annotation, voc2007

C = {name: i for i, name in enumerate(VOC_CLASSES)}

# image id -> objects as (class, difficult); the expected targets below are written out by hand.
OBJECTS: dict[str, list[tuple[str, bool]]] = {
    "000001": [("dog", False), ("person", False)],
    "000002": [("cat", False)],
    "000003": [("car", True)],                                   # only difficult: -1
    "000004": [("car", True), ("car", False), ("bus", True)],    # car both ways: 1; bus: -1
    "000005": [],                                                # no objects at all
    "000006": [("aeroplane", False), ("tvmonitor", True), ("tvmonitor", True)],
    "000007": [("person", True), ("dog", False)],
    "000008": [("sheep", False), ("sheep", False)],
    "000009": [("bicycle", True)],
    "000010": [("tvmonitor", False), ("person", False), ("person", True)],
}
TRAINVAL = ["000001", "000002", "000003", "000004", "000005", "000006"]
TEST = ["000007", "000008", "000009", "000010"]


def _row(**values: int) -> list[int]:
    row = [0] * len(VOC_CLASSES)
    for name, v in values.items():
        row[C[name]] = v
    return row


EXPECTED_TRAINVAL = np.array([
    _row(dog=1, person=1),
    _row(cat=1),
    _row(car=-1),
    _row(car=1, bus=-1),
    _row(),
    _row(aeroplane=1, tvmonitor=-1),
], dtype=np.int64)
EXPECTED_TEST = np.array([
    _row(person=-1, dog=1),
    _row(sheep=1),
    _row(bicycle=-1),
    _row(tvmonitor=1, person=1),
], dtype=np.int64)


def _xml(image_id: str, objects: list[tuple[str, bool]], *, with_difficult: bool = True) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
             "<size><width>40</width><height>30</height><depth>3</depth></size>"]
    for name, difficult in objects:
        tag = f"<difficult>{int(difficult)}</difficult>" if with_difficult else ""
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>{tag}"
                     "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def _colour(image_id: str) -> tuple[int, int, int]:
    k = int(image_id)
    return (20 * k, 255 - 20 * k, 100)


def write_devkit(folder: Path) -> Path:
    """A 6 trainval + 4 test devkit under ``folder``: 40x30 solid-colour JPEGs and their annotations."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in OBJECTS.items():
        image = Image.new("RGB", (40, 30), _colour(image_id))
        image.save(folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (folder / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
    (folder / "ImageSets/Main/trainval.txt").write_text("\n".join(TRAINVAL) + "\n")
    (folder / "ImageSets/Main/test.txt").write_text("\n".join(TEST) + "\n")
    return folder


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    return write_devkit(tmp_path / "voc")


def test_classes_are_the_standard_twenty_in_order() -> None:
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES)
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person" and VOC_CLASSES[-1] == "tvmonitor"


def test_targets_match_the_hand_written_expectation(devkit: Path) -> None:
    voc = voc2007(devkit, image_size=16)
    assert isinstance(voc, VOC2007) and voc.classes == VOC_CLASSES
    assert voc.trainval_targets.shape == (6, 20) and voc.test_targets.shape == (4, 20)
    assert voc.trainval_targets.dtype == np.int64 and voc.test_targets.dtype == np.int64
    np.testing.assert_array_equal(voc.trainval_targets, EXPECTED_TRAINVAL)
    np.testing.assert_array_equal(voc.test_targets, EXPECTED_TEST)


def test_images_load_in_split_order_with_label_minus_one(devkit: Path) -> None:
    voc = voc2007(devkit, image_size=12)
    assert isinstance(voc.trainval, FileImageDataset) and isinstance(voc.test, FileImageDataset)
    assert len(voc.trainval) == 6 and len(voc.test) == 4
    assert [Path(p).stem for p, _ in voc.trainval.samples] == TRAINVAL
    assert [Path(p).stem for p, _ in voc.test.samples] == TEST
    assert torch.equal(voc.trainval.labels, torch.full((6,), -1))
    for ds, ids in ((voc.trainval, TRAINVAL), (voc.test, TEST)):
        for i, image_id in enumerate(ids):
            index, image, label = ds[i]
            assert index == i and label == -1
            assert image.shape == (3, 12, 12) and image.dtype == torch.uint8
            # Solid colour survives the resize and crop (JPEG may shift it by a few levels).
            mean = image.float().mean((1, 2))
            expected = torch.tensor(_colour(image_id), dtype=torch.float)
            assert torch.allclose(mean, expected, atol=6), (image_id, mean)


@pytest.mark.parametrize("sub", ["VOC2007", "VOCdevkit/VOC2007"])
def test_parent_folder_variants(tmp_path: Path, sub: str) -> None:
    write_devkit(tmp_path / sub)
    voc = voc2007(str(tmp_path), image_size=8)  # a str root works too
    np.testing.assert_array_equal(voc.trainval_targets, EXPECTED_TRAINVAL)
    np.testing.assert_array_equal(voc.test_targets, EXPECTED_TEST)
    assert Path(voc.test.samples[0][0]) == tmp_path / sub / "JPEGImages" / "000007.jpg"


def test_read_annotation(devkit: Path) -> None:
    objects = read_annotation(devkit / "Annotations" / "000004.xml")
    assert objects == [("car", True), ("car", False), ("bus", True)]
    assert read_annotation(devkit / "Annotations" / "000005.xml") == []
    # Annotations without <difficult> (as in some VOC releases) count as not difficult.
    path = devkit / "Annotations" / "000004.xml"
    path.write_text(_xml("000004", [("car", True), ("bus", True)], with_difficult=False))
    assert read_annotation(path) == [("car", False), ("bus", False)]


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _delete(rel: str) -> Callable[[Path], Path]:
    def change(devkit: Path) -> Path:
        (devkit / rel).unlink()
        return devkit / rel
    return change


def _unknown_class(devkit: Path) -> Path:
    bad = devkit / "Annotations" / "000002.xml"
    bad.write_text(_xml("000002", [("cat", False), ("unicorn", False)]))
    return bad


@pytest.mark.parametrize("change, error, fragments", [
    (_delete("Annotations/000008.xml"), FileNotFoundError, ["Annotations/<id>.xml"]),
    (_delete("ImageSets/Main/test.txt"), FileNotFoundError, ["one image id per line"]),
    (_unknown_class, ValueError, ["'unicorn'"]),
    (_delete("JPEGImages/000003.jpg"), FileNotFoundError, ["trainval.txt", "JPEGImages/<id>.jpg"]),
], ids=["missing annotation", "missing split file", "unknown class", "missing image"])
def test_broken_devkit_is_one_line_naming_the_file(devkit: Path, change: Callable[[Path], Path],
                                                   error: type[Exception], fragments: list[str]) -> None:
    culprit = change(devkit)
    with pytest.raises(error) as e:
        voc2007(devkit, image_size=8)
    msg = _one_line(e)
    assert str(culprit) in msg and all(f in msg for f in fragments), msg


def test_missing_folder_and_root(tmp_path: Path) -> None:
    devkit = write_devkit(tmp_path / "voc")
    shutil.rmtree(devkit / "Annotations")
    with pytest.raises(FileNotFoundError) as e:
        voc2007(devkit, image_size=8)
    msg = _one_line(e)
    assert "Annotations/" in msg and str(devkit) in msg and "ImageSets/Main/{trainval,test}.txt" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        voc2007(empty, image_size=8)
    msg = _one_line(e)
    assert str(empty) in msg and "VOCdevkit/VOC2007/" in msg and "JPEGImages/<id>.jpg" in msg

    with pytest.raises(FileNotFoundError, match="does not exist"):
        voc2007(tmp_path / "nowhere", image_size=8)


def test_malformed_split_and_annotation(devkit: Path) -> None:
    split = devkit / "ImageSets" / "Main" / "trainval.txt"
    split.write_text("000001 1\n")  # a per-class file's format, not Main/<split>.txt's
    with pytest.raises(ValueError, match=r"line 1: expected one image id"):
        voc2007(devkit, image_size=8)
    split.write_text("\n\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        voc2007(devkit, image_size=8)
    bad = devkit / "Annotations" / "000001.xml"
    bad.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="not valid XML"):
        read_annotation(bad)
