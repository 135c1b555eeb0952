"""Prediction files: round trips through DOTA Task1 and JSON, and errors that name file and line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rkd.errors import DataError
from rkd.eval import read_dota_task1, read_json_predictions, write_dota_task1, write_json_predictions
from rkd.geometry import normalize_le90, obb_to_poly

CLASSES = ["plane", "small-vehicle", "ship"]


def make_predictions(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    preds = {}
    for image_id in ["P0001", "P0002__1024__0___512", "7"]:
        n = int(rng.integers(1, 8))
        boxes = np.stack(
            [
                rng.uniform(0, 1000, n),
                rng.uniform(0, 1000, n),
                rng.uniform(20, 90, n),
                rng.uniform(5, 19, n),
                rng.uniform(-math.pi / 2, math.pi / 2, n),
            ],
            1,
        )
        preds[image_id] = {
            "boxes": torch.from_numpy(boxes),
            "scores": torch.from_numpy(rng.uniform(0, 1, n)),
            "labels": torch.from_numpy(rng.integers(0, 3, n)),
        }
    return preds


def assert_same(read, written):
    assert set(read) == set(written)
    for image_id, det in written.items():
        got = read[image_id]
        # files group lines by class, so compare as sets keyed by score
        order_w = torch.argsort(det["scores"])
        order_r = torch.argsort(got["scores"])
        assert torch.equal(got["scores"][order_r], det["scores"][order_w].double())
        assert torch.equal(got["labels"][order_r], det["labels"][order_w])
        torch.testing.assert_close(got["polys"][order_r], obb_to_poly(det["boxes"][order_w]), rtol=0, atol=1e-9)
        torch.testing.assert_close(got["boxes"][order_r], normalize_le90(det["boxes"][order_w]), rtol=0, atol=1e-7)


def test_dota_task1_round_trip(tmp_path):
    preds = make_predictions()
    paths = write_dota_task1(tmp_path, preds, CLASSES)
    assert [p.name for p in paths] == ["Task1_plane.txt", "Task1_small-vehicle.txt", "Task1_ship.txt"]
    first = paths[0].read_text().splitlines()[0].split()
    assert len(first) == 10 and first[0] in preds
    assert_same(read_dota_task1(tmp_path, CLASSES), preds)
    # a single file can be read too, and holds only its class
    one = read_dota_task1(paths[2], CLASSES)
    assert all((d["labels"] == 2).all() for d in one.values())


@pytest.mark.parametrize("box_format", ["poly", "obb"])
def test_json_round_trip(tmp_path, box_format):
    preds = make_predictions(1)
    path = tmp_path / "preds.json"
    write_json_predictions(path, preds, CLASSES, box_format=box_format)
    entries = json.loads(path.read_text())
    assert {"image_id", "label", "class", "score", box_format} == set(entries[0])
    assert_same(read_json_predictions(path, CLASSES), preds)


def test_task1_errors_name_file_and_line(tmp_path):
    good = "P1 0.9 0 0 10 0 10 5 0 5\n"
    (tmp_path / "Task1_plane.txt").write_text(good + "\n" + "P1 0.8 0 0 10 0 10 5 0\n")
    with pytest.raises(DataError, match=r"Task1_plane.txt:3: expected 'image_id score .*' \(10 fields\), got 9"):
        read_dota_task1(tmp_path, CLASSES)
    (tmp_path / "Task1_plane.txt").write_text(good + "P1 high 0 0 10 0 10 5 0 5\n")
    with pytest.raises(DataError, match=r"Task1_plane.txt:2: score 'high' is not a number"):
        read_dota_task1(tmp_path, CLASSES)
    (tmp_path / "Task1_plane.txt").write_text("P1 0.5 0 0 10 nan 10 5 0 5\n")
    with pytest.raises(DataError, match=r"Task1_plane.txt:1: coordinate 'nan' is not finite"):
        read_dota_task1(tmp_path, CLASSES)
    (tmp_path / "Task1_plane.txt").write_text(good)
    (tmp_path / "Task1_tank.txt").write_text(good)
    with pytest.raises(DataError, match=r"Task1_tank.txt: file name must be Task1_<class>.txt"):
        read_dota_task1(tmp_path, CLASSES)


def test_json_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.json"
    cases = [
        (
            '[\n{"image_id": "a", "label": 0, "score": 0.5, "obb": [1, 2, 3, 4, 0]},\n'
            '{"image_id": "a", "label": 0, "score": 0.5, "obb": [1, 2, 3]}\n]',
            r"p.json:3: 'obb' must be a list of 5",
        ),
        (
            '[\n\n{"image_id": "a", "class": "car", "score": 0.5, "poly": [0, 0, 1, 0, 1, 1, 0, 1]}]',
            r"p.json:3: unknown class 'car'",
        ),
        (
            '[{"image_id": "a", "label": 1, "class": "plane", "score": 0.5, "poly": [0, 0, 1, 0, 1, 1, 0, 1]}]',
            r"p.json:1: 'label' 1 disagrees with 'class' 'plane'",
        ),
        (
            '[{"image_id": "a", "label": 0, "score": "x", "obb": [1, 2, 3, 4, 0]}]',
            r"p.json:1: 'score' must be a number",
        ),
        (
            '[{"image_id": "a", "label": 0, "score": 1, "obb": [1, 2, 3, 4, 0], "poly": [0, 0, 1, 0, 1, 1, 0, 1]}]',
            r"p.json:1: give exactly one of 'poly'",
        ),
        ('[\n{"image_id": "a", "score": 1, "obb": [1, 2, 3, 4, 0]}\n]', r"p.json:2: needs 'label'"),
        ('[\n{"image_id": "a",\n "label": 0 "score": 1}]', r"p.json:3: invalid JSON"),
        ('{"image_id": "a"}', r"p.json:1: expected a JSON list"),
        ('[{"image_id": "a", "label": 0, "score": 1, "obb": [1, 2, 3, 4, 0]}\n\n{}]', r"p.json:3: expected ',' or"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_json_predictions(path, CLASSES)
    path.write_text("[]")
    assert read_json_predictions(path) == {}
    with pytest.raises(DataError, match="not found"):
        read_json_predictions(tmp_path / "missing.json")
