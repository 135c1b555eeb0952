"""Readers, the synthetic set, letterboxing and batching, on the real UCAS-AOD files and written fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapely.geometry import Polygon

from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.data.dota import read_dota
from rkd.data.sample import Sample
from rkd.data.synthetic import SyntheticAerial
from rkd.data.transforms import flip, letterbox
from rkd.data.ucas import read_ucas
from rkd.errors import DataError, SpecError
from rkd.geometry import obb_to_poly

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UCAS = SHARED / "ucas50"
needs_ucas = pytest.mark.skipif(not UCAS.is_dir(), reason="../shared/data/ucas50 not present")


@needs_ucas
def test_ucas50_counts_match_its_readme():
    train, names, report_train = read_ucas(UCAS, "train")
    val, _, report_val = read_ucas(UCAS, "val")
    assert names == ["plane", "car"]
    assert (len(train), len(val)) == (40, 9)
    labels = torch.cat([r.labels for r in train + val])
    assert len(labels) == 375 and int((labels == 0).sum()) == 219 and int((labels == 1).sum()) == 156
    assert report_train.skipped == [] and report_val.skipped == []


@needs_ucas
def test_ucas_boxes_cover_their_polygons():
    """The le90 box of each labelled quadrilateral has the polygon's area and centre (float64 shapely)."""
    records, _, _ = read_ucas(UCAS, "val")
    checked = 0
    for record in records:
        height, width = record.image_size
        label = (UCAS / "labels" / "val" / f"{record.image_id}.txt").read_text().split("\n")
        rows = [np.array(line.split()[1:], dtype=float) for line in label if line.strip()]
        for row, box in zip(rows, record.boxes):
            poly = Polygon((row.reshape(4, 2) * [width, height]).tolist())
            assert float(box[2] * box[3]) == pytest.approx(poly.area, rel=0.05)
            assert float(box[0]) == pytest.approx(poly.centroid.x, abs=1.0)
            assert float(box[1]) == pytest.approx(poly.centroid.y, abs=1.0)
            assert box[2] >= box[3] and -np.pi / 2 <= box[4] < np.pi / 2  # le90
            checked += 1
    assert checked > 50


def write_ucas(root: Path, label_text: str, size=(40, 60)) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size).save(root / "images" / "train" / "a.png")  # RGBA like ucas50
    path = root / "labels" / "train" / "a.txt"
    path.write_text(label_text)
    return path


@pytest.mark.parametrize(
    "line, why",
    [
        ("0 0.1 0.1 0.2", "expected 9 fields"),
        ("0 0.1 0.1 0.5 0.1 0.5 abc 0.1 0.5", "abc"),
        ("5 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5", "out of range"),
    ],
)
def test_bad_label_lines_name_file_and_line(tmp_path, line, why):
    good = "0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n"
    path = write_ucas(tmp_path, good + line + "\n")
    with pytest.raises(DataError) as err:
        read_ucas(tmp_path, "train")
    assert f"{path}:2" in str(err.value) and why in str(err.value)
    records, _, report = read_ucas(tmp_path, "train", on_error="skip")
    assert len(records[0].labels) == 1  # the good line is kept
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{path}:2:")


def test_missing_split_folder_is_named(tmp_path):
    with pytest.raises(DataError) as err:
        read_ucas(tmp_path, "train")
    assert str(tmp_path) in str(err.value)


def test_dota_labeltxt_with_headers_and_difficult(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labelTxt").mkdir(parents=True)
    Image.new("RGB", (100, 80)).save(tmp_path / "train" / "images" / "P0001.png")
    (tmp_path / "train" / "labelTxt" / "P0001.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.5\n10 10 50 10 50 30 10 30 ship 0\n60 20 80 20 80 60 60 60 plane 1\n"
    )
    records, names, report = read_dota(tmp_path, "train", None)
    assert names == ["plane", "ship"]  # sorted when not given
    (record,) = records
    assert record.labels.tolist() == [1, 0] and record.difficult.tolist() == [False, True]
    np.testing.assert_allclose(record.boxes[0].numpy(), [30, 20, 40, 20, 0], atol=1e-5)
    # the tall box becomes long-side-first with angle -pi/2 (le90)
    np.testing.assert_allclose(record.boxes[1, :4].numpy(), [70, 40, 40, 20], atol=1e-5)
    assert abs(abs(float(record.boxes[1, 4])) - np.pi / 2) < 1e-5
    assert report.images == 1 and report.objects == 2


def box_mask(boxes: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside any box, rasterised independently with shapely-free maths."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mask = np.zeros((h, w), bool)
    for poly in obb_to_poly(boxes.double()).numpy():
        p = poly.reshape(4, 2)
        e1, e2 = p[1] - p[0], p[2] - p[1]
        clockwise = e1[0] * e2[1] - e1[1] * e2[0] > 0
        inside = np.ones((h, w), bool)
        for i in range(4):
            a, b = p[i], p[(i + 1) % 4]
            cross = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
            inside &= cross >= 0 if clockwise else cross <= 0
        mask |= inside
    return mask


def test_letterbox_keeps_boxes_on_the_same_pixels():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    boxes = torch.tensor([[60.0, 40.0, 50.0, 16.0, 0.5], [150.0, 60.0, 30.0, 20.0, -1.2]])
    mask = box_mask(boxes, (100, 200))
    image[:, torch.from_numpy(mask)] = 255  # draw the boxes, then transform image and boxes
    sample = Sample(image, boxes, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool), "x", (100, 200))
    out, scale = letterbox(sample, 128)
    assert scale == pytest.approx(0.64) and tuple(out.image.shape) == (3, 128, 128)
    drawn_after = box_mask(out.boxes, (128, 128))
    bright = out.image[0].numpy() > 127
    # the resized drawing and the transformed boxes cover the same pixels (up to the 1-px border)
    disagree = bright ^ drawn_after
    assert disagree.sum() <= 0.15 * drawn_after.sum()


def test_flip_twice_is_identity_and_keeps_le90():
    boxes = torch.tensor([[30.0, 20.0, 20.0, 10.0, 0.3], [10.0, 40.0, 12.0, 4.0, -np.pi / 2]])
    sample = Sample(
        torch.randint(0, 255, (3, 50, 60), dtype=torch.uint8),
        boxes,
        torch.tensor([0, 1]),
        torch.zeros(2, dtype=torch.bool),
        "x",
        (50, 60),
    )
    once = flip(sample, horizontal=True, vertical=False)
    assert (once.boxes[:, 4] >= -np.pi / 2).all() and (once.boxes[:, 4] < np.pi / 2).all()
    assert torch.equal(once.image, sample.image.flip(-1))
    twice = flip(once, horizontal=True, vertical=False)
    assert torch.equal(twice.image, sample.image)
    np.testing.assert_allclose(twice.boxes.numpy(), boxes.numpy(), atol=1e-5)


def test_synthetic_set_is_deterministic_and_seeded():
    a, b, c = SyntheticAerial(3, 128, seed=4), SyntheticAerial(3, 128, seed=4), SyntheticAerial(3, 128, seed=5)
    for i in range(3):
        assert torch.equal(a[i].image, b[i].image) and torch.equal(a[i].boxes, b[i].boxes)
    assert not torch.equal(a[0].image, c[0].image)
    assert all(len(a[i].labels) > 0 for i in range(3))


def test_build_dataset_and_collate():
    spec = validate_data_spec({"format": "synthetic", "num_classes": 2, "num_train": 3, "num_val": 2, "input_size": 64})
    train, val = build_dataset(spec, "train", True), build_dataset(spec, "val", False)
    assert (len(train), len(val)) == (3, 2) and train.class_names == ["ship", "plane"]
    assert not torch.equal(train.records[0].boxes, val.records[0].boxes)  # different seeds per split
    images, targets, metas = collate_detection([val[0], val[1]])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert abs(float(images.mean())) < 3  # ImageNet-normalised
    assert targets.image_size == (64, 64) and len(targets.boxes) == 2 and targets.boxes[0].shape[1] == 5
    assert metas[0]["image_id"] == val.records[0].image_id


@pytest.mark.parametrize(
    "spec, path, needle",
    [
        ({"format": "synthetic", "input_size": 300}, "input_size", "multiple of 32"),
        ({"format": "coco9"}, "format", "expected one of"),
        ({"format": "synthetic", "colour": 1}, "colour", "unknown key"),
        ({"format": "ucas"}, "root", "needs 'root'"),
        ({"format": "ucas", "root": "/nonexistent/x"}, "root", "does not exist"),
        ({"format": "synthetic", "num_classes": 9}, "num_classes", "at most"),
    ],
)
def test_validate_data_spec_names_the_entry(spec, path, needle):
    with pytest.raises(SpecError) as err:
        validate_data_spec(spec)
    assert err.value.path == path and needle in err.value.message


def test_synthetic_data_takes_the_specs_augmentations():
    spec = {"format": "synthetic", "num_classes": 2, "num_train": 3, "num_val": 1, "input_size": 64}
    off = {"flip": False, "rot90": False, "scale": None, "color": 0.0}
    plain = build_dataset(validate_data_spec(spec), "train", train=False)
    unaugmented = build_dataset(validate_data_spec({**spec, "augment": off}), "train", train=True)
    assert unaugmented.augment == off
    torch.manual_seed(0)
    assert all(torch.equal(unaugmented[i].image, plain[i].image) for i in range(3))
    turned = build_dataset(validate_data_spec({**spec, "augment": {**off, "rot90": True}}), "train", train=True)
    torch.manual_seed(0)
    assert any(not torch.equal(turned[i].image, plain[i].image) for i in range(3))  # 3 draws of 4 turns
