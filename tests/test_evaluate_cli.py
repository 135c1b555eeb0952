"""`rkd evaluate` on real UCAS-AOD labels: GT as predictions, perturbed predictions, patches, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rkd.cli import main
from rkd.data.tiling import tile_records
from rkd.data.ucas import read_ucas
from rkd.errors import DataError
from rkd.eval import evaluate_detections, write_dota_task1, write_json_predictions
from rkd.eval.cli import evaluate_files
from rkd.geometry import poly_to_obb

UCAS = Path("/work/shared/data/ucas50")


@pytest.fixture(scope="module")
def val():
    records, names, _ = read_ucas(UCAS, "val")
    return records, names


def gt_as_predictions(records) -> dict:
    return {
        r.image_id: {"boxes": r.boxes.double(), "scores": torch.ones(len(r.labels)), "labels": r.labels}
        for r in records
    }


def perturbed(records, seed: int) -> dict:
    """Jittered boxes with random scores, some objects missed, some false boxes added."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r in records:
        n = len(r.labels)
        boxes = r.boxes.double().clone()
        boxes[:, :2] += torch.randn(n, 2, generator=g, dtype=torch.float64) * boxes[:, 3:4] * 0.15
        boxes[:, 2:4] *= 1 + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        boxes[:, 2:4] = boxes[:, 2:4].abs() + 1
        keep = torch.rand(n, generator=g) > 0.15
        false = boxes[:3].clone()
        false[:, :2] += 300
        out[r.image_id] = {
            "boxes": torch.cat([boxes[keep], false]),
            "scores": torch.rand(int(keep.sum()) + len(false), generator=g, dtype=torch.float64),
            "labels": torch.cat([r.labels[keep], r.labels[:3]]),
        }
    return out


def run_json(capsys, *args: str) -> dict:
    code = main(["evaluate", "--gt", str(UCAS), "--gt-format", "ucas", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)  # exactly one JSON document on stdout


def test_ground_truth_as_predictions_scores_one(tmp_path, capsys, val):
    records, names = val
    write_dota_task1(tmp_path / "task1", gt_as_predictions(records), names)
    result = run_json(capsys, "--pred", str(tmp_path / "task1"))
    assert set(result) == {"mAP", "mAP50", "mAP75", "per_class", "protocol"}
    # UCAS ground truth keeps its labelled corners, Task1 detections are polygons: compared as polygons
    assert result["protocol"] == {
        "iou": "polygon",
        "ap": "all-point",
        "matching": "voc",
        "difficult": "ignored",
        "split": "val",
        "skipped_lines": 0,
    }
    assert result["mAP"] == result["mAP50"] == result["mAP75"] == 1.0
    assert result["per_class"] == {
        "plane": {"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "num_gt": 34},
        "car": {"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "num_gt": 42},
    }
    assert main(["evaluate", "--gt", str(UCAS), "--gt-format", "ucas", "--pred", str(tmp_path / "task1")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["class", "num_gt", "AP@0.5", "AP50", "AP75"]
    assert table[1].split() == ["plane", "34", "1.0000", "1.0000", "1.0000"]
    assert table[-2] == "mAP@0.5 1.0000  mAP50 1.0000  mAP75 1.0000"
    assert table[-1].startswith("protocol: IoU polygon, all-point AP, voc matching, difficult ignored, split val")


def test_perturbed_predictions_match_evaluate_detections(tmp_path, capsys, val):
    records, names = val
    preds = perturbed(records, seed=0)
    write_dota_task1(tmp_path / "task1", preds, names)
    write_json_predictions(tmp_path / "preds.json", preds, names)
    truths = [{"boxes": r.polygons, "labels": r.labels, "difficult": r.difficult} for r in records]
    detections = [preds[r.image_id] for r in records]

    def direct(iou: float):  # the labelled corners and the files' polygons, the same (VOC/DOTA) matching
        return evaluate_detections(detections, truths, len(names), iou_threshold=iou, matching="voc")

    from_task1 = run_json(capsys, "--pred", str(tmp_path / "task1"), "--iou", "0.6")
    from_json = run_json(capsys, "--pred", str(tmp_path / "preds.json"), "--iou", "0.6")
    assert from_task1 == from_json
    assert 0.2 < from_task1["mAP50"] < 0.99  # the perturbation matters, so the comparison means something
    assert from_task1["mAP"] == pytest.approx(direct(0.6).map, abs=1e-12)
    assert from_task1["mAP50"] == pytest.approx(direct(0.5).map, abs=1e-12)
    assert from_task1["mAP75"] == pytest.approx(direct(0.75).map, abs=1e-12)
    assert from_task1["per_class"]["car"]["ap75"] == pytest.approx(direct(0.75).per_class[1], abs=1e-12)


def test_records_keep_the_labelled_corners_beside_unchanged_boxes(val):
    """Evaluation gets the corners as written (in pixels); training still gets their minimum-area rectangles."""
    records, _ = val
    assert sum(len(r.labels) for r in records) == 76
    for r in records:
        with Image.open(r.image_path) as im:
            w, h = im.size
        path = UCAS / "labels" / "val" / f"{r.image_id}.txt"
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        corners = np.array([[float(v) for v in f[1:]] for f in rows]).reshape(-1, 8) * np.array([w, h] * 4)
        np.testing.assert_array_equal(r.polygons.numpy(), corners)
        assert r.labels.tolist() == [int(f[0]) for f in rows]
        assert r.difficulty.tolist() == [0] * len(rows) and not r.difficult.any()
        assert r.boxes.dtype == torch.float32
        assert torch.equal(r.boxes, poly_to_obb(torch.from_numpy(corners)).float())


def test_patch_predictions_are_merged_into_scenes(tmp_path, val):
    records, names = val
    patches = tile_records(records, 1024, 200, 0.7)
    # Patch ground truth as detections; a cut copy scores lower than the whole one seen by another patch.
    preds = {
        p.image_id: {"boxes": p.boxes.double(), "scores": 1.0 - 0.5 * p.difficult.double(), "labels": p.labels}
        for p in patches
    }
    assert len(patches) > len(records)
    write_dota_task1(tmp_path / "task1", preds, names)
    result = evaluate_files(UCAS, "ucas", tmp_path / "task1", "val")
    assert result["mAP50"] == 1.0 and result["mAP75"] == 1.0


def test_bad_prediction_line_names_file_and_line(tmp_path, capsys, val):
    records, names = val
    write_dota_task1(tmp_path / "task1", gt_as_predictions(records[:1]), names)
    path = tmp_path / "task1" / "Task1_plane.txt"
    lines = path.read_text().splitlines()
    lines.insert(1, f"{records[0].image_id} 0.5 1 2 3 4 5 6 7")
    path.write_text("\n".join(lines) + "\n")
    code = main(["evaluate", "--gt", str(UCAS), "--gt-format", "ucas", "--pred", str(tmp_path / "task1")])
    expected = f"{path}:2: expected 'image_id score x1 y1 x2 y2 x3 y3 x4 y4' (10 fields), got 9"
    assert code == 2 and capsys.readouterr().err == f"rkd: error: {expected}\n"
    lines[1] = f"{records[0].image_id} high 1 2 3 4 5 6 7 8"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"Task1_plane.txt:2: score 'high' is not a number"):
        evaluate_files(UCAS, "ucas", tmp_path / "task1")


def test_unknown_images_formats_and_missing_files_are_data_errors(tmp_path, val):
    records, names = val
    preds = gt_as_predictions(records[:2])
    preds["not_a_val_image"] = preds[records[0].image_id]
    write_json_predictions(tmp_path / "p.json", preds, names)
    with pytest.raises(DataError, match=r"p.json: predictions for image 'not_a_val_image' \(1 unknown ids\)"):
        evaluate_files(UCAS, "ucas", tmp_path / "p.json")
    with pytest.raises(DataError, match=r"--gt-format 'nope': expected one of \[.*'ucas'"):
        evaluate_files(UCAS, "nope", tmp_path / "p.json")
    with pytest.raises(DataError, match="prediction file or folder not found"):
        evaluate_files(UCAS, "ucas", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no Task1_<class>.txt files in this folder"):
        evaluate_files(UCAS, "ucas", tmp_path / "empty")
