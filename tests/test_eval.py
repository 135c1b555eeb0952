"""mAP on hand-computed cases, difficult/crowd handling, and COCO mode against pycocotools."""

from __future__ import annotations

import contextlib
import io
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from rkd.errors import DataError
from rkd.eval import evaluate_coco, evaluate_detections
from rkd.geometry import hbb_to_obb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def one_image(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, difficult=None):
    gt = {"boxes": torch.tensor(gt_boxes, dtype=torch.float32), "labels": torch.tensor(gt_labels)}
    if difficult is not None:
        gt["difficult"] = torch.tensor(difficult)
    det = {
        "boxes": torch.tensor(det_boxes, dtype=torch.float32),
        "scores": torch.tensor(det_scores),
        "labels": torch.tensor(det_labels),
    }
    return [det], [gt]


# Two ground truths; detections ranked TP (exact G1), FP (duplicate of G1), TP (G2 shifted 1 px, IoU 90/110).
# precision after each: 1, 1/2, 2/3; recall: 1/2, 1/2, 1.
G = [[0, 0, 10, 10], [20, 0, 30, 10]]
D = [[0, 0, 10, 10], [0, 0, 10, 10], [21, 0, 31, 10]]
S = [0.9, 0.8, 0.7]


def test_all_point_ap_by_hand():
    dets, gts = one_image(G, [0, 0], D, S, [0, 0, 0])
    res = evaluate_detections(dets, gts, num_classes=1, oriented=False)
    # envelope: 1 up to recall 1/2, then 2/3 up to recall 1
    assert res.map == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert res.per_class == {0: pytest.approx(0.5 * 1 + 0.5 * 2 / 3)}
    assert res.num_gt == {0: 2}


def test_11_point_and_coco101_by_hand():
    dets, gts = one_image(G, [0, 0], D, S, [0, 0, 0])
    voc07 = evaluate_detections(dets, gts, num_classes=1, oriented=False, use_07_metric=True)
    # recall points 0, .1, .., .5 see precision 1; .6 .. 1 see 2/3
    assert voc07.map == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    coco = evaluate_detections(dets, gts, num_classes=1, oriented=False, interpolation="coco101")
    assert coco.map == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=1e-12)
    # a threshold above the shifted box's IoU (0.818) turns the third detection into a FP: AP = 1/2
    strict = evaluate_detections(dets, gts, num_classes=1, oriented=False, iou_threshold=0.85)
    assert strict.map == pytest.approx(0.5)


def test_oriented_boxes_give_the_same_hand_result_and_use_exact_iou():
    dets, gts = one_image(
        hbb_to_obb(torch.tensor(G, dtype=torch.float32)).tolist(),
        [0, 0],
        hbb_to_obb(torch.tensor(D, dtype=torch.float32)).tolist(),
        S,
        [0, 0, 0],
    )
    assert evaluate_detections(dets, gts, num_classes=1).map == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a square and the same square turned 45 degrees: exact IoU is 1/sqrt(2) = 0.7071
    # (their axis-aligned boxes would give 0.5, so a horizontal shortcut fails this)
    sq = [[50.0, 50.0, 10.0, 10.0, 0.0]]
    turned = [[50.0, 50.0, 10.0, 10.0, math.pi / 4]]
    dets, gts = one_image(sq, [0], turned, [0.5], [0])
    assert evaluate_detections(dets, gts, num_classes=1, iou_threshold=0.70).map == pytest.approx(1.0)
    assert evaluate_detections(dets, gts, num_classes=1, iou_threshold=0.71).map == pytest.approx(0.0)
    # polygons are accepted for oriented boxes
    poly = [[45.0, 45.0, 55.0, 45.0, 55.0, 55.0, 45.0, 55.0]]
    dets, gts = one_image(sq, [0], poly, [0.5], [0])
    assert evaluate_detections(dets, gts, num_classes=1, iou_threshold=0.99).map == pytest.approx(1.0)


def test_detection_takes_the_best_unmatched_ground_truth():
    # G1 and G2 overlap; the first detection is G1 exactly, the second overlaps G1 (IoU 0.9) and G2 (IoU 0.6):
    # G1 is taken, so it matches G2 and both are TPs (AP 1).
    g = [[0, 0, 10, 10], [2, 0, 12, 10]]
    d = [[0, 0, 10, 10], [1, 0, 11, 10]]
    dets, gts = one_image(g, [0, 0], d, [0.9, 0.8], [0, 0])
    assert evaluate_detections(dets, gts, num_classes=1, oriented=False).map == pytest.approx(1.0)
    # above that second IoU (9/11 = 0.818 with G2) it is a duplicate: TP, FP -> AP 1/2
    res = evaluate_detections(dets, gts, num_classes=1, oriented=False, iou_threshold=0.85)
    assert res.map == pytest.approx(0.5)


def test_difficult_ground_truth_is_neither_tp_nor_fp():
    # G1 regular, G2 difficult. Ranking: det on G2 (ignored), det on G2 again (ignored, difficult ones repeat),
    # det on G1 (TP), far-away det (FP). Counted: TP, FP -> precision 1, 1/2 at recall 1, 1 -> AP 1.
    g = [[0, 0, 10, 10], [50, 50, 60, 60]]
    d = [[50, 50, 60, 60], [51, 50, 61, 60], [0, 0, 10, 10], [200, 200, 210, 210]]
    dets, gts = one_image(g, [0, 0], d, [0.9, 0.8, 0.7, 0.6], [0] * 4, difficult=[False, True])
    res = evaluate_detections(dets, gts, num_classes=1, oriented=False)
    assert res.map == pytest.approx(1.0)
    assert res.num_gt == {0: 1}
    # without the difficult flag the ranking is TP, FP, TP, FP: precision 1, 1/2, 2/3, 1/2; AP = .5 + .5 * 2/3
    dets, gts = one_image(g, [0, 0], d, [0.9, 0.8, 0.7, 0.6], [0] * 4)
    assert evaluate_detections(dets, gts, num_classes=1, oriented=False).map == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a detection overlapping a regular and a difficult GT takes the regular one even at lower IoU
    g = [[0, 0, 10, 10], [3, 0, 13, 10]]
    dets, gts = one_image(g, [0, 0], [[2, 0, 12, 10]], [0.9], [0], difficult=[False, True])
    assert evaluate_detections(dets, gts, num_classes=1, oriented=False).map == pytest.approx(1.0)


def test_classes_without_ground_truth_are_left_out_and_empty_class_scores_zero():
    g = [[0, 0, 10, 10]]
    d = [[0, 0, 10, 10], [30, 30, 40, 40]]
    dets, gts = one_image(g, [0], d, [0.9, 0.8], [0, 2])  # class 2 has detections but no GT; class 1 nothing
    res = evaluate_detections(dets, gts, num_classes=3, oriented=False)
    assert res.per_class == {0: 1.0} and res.map == 1.0
    # a class with GT but no detections has AP 0 and pulls the mean down
    dets, gts = one_image([[0, 0, 10, 10], [30, 30, 40, 40]], [0, 1], [[0, 0, 10, 10]], [0.9], [0])
    res = evaluate_detections(dets, gts, num_classes=2, oriented=False)
    assert res.per_class == {0: 1.0, 1: 0.0} and res.map == 0.5
    assert math.isnan(
        evaluate_detections(
            [{"boxes": np.zeros((0, 5)), "scores": [], "labels": []}],
            [{"boxes": np.zeros((0, 5)), "labels": []}],
            num_classes=1,
        ).map
    )


def test_perfect_detections_on_many_images_give_map_one():
    rng = np.random.default_rng(0)
    dets, gts = [], []
    for _ in range(20):
        n = int(rng.integers(0, 15))
        boxes = np.stack(
            [
                rng.uniform(0, 500, n),
                rng.uniform(0, 500, n),
                rng.uniform(10, 80, n),
                rng.uniform(5, 10, n),
                rng.uniform(-1.5, 1.5, n),
            ],
            1,
        )
        labels = rng.integers(0, 4, n)
        gts.append({"boxes": boxes, "labels": labels})
        dets.append(
            {
                "boxes": torch.from_numpy(boxes),
                "scores": torch.from_numpy(rng.uniform(0, 1, n)),
                "labels": torch.from_numpy(labels),
            }
        )
    res = evaluate_detections(dets, gts, num_classes=4)
    assert res.map == 1.0 and set(res.per_class) == {0, 1, 2, 3}
    coco = evaluate_coco(dets, gts, num_classes=4)
    assert coco.map == pytest.approx(1.0) and coco.map75 == pytest.approx(1.0)
    assert res.as_dict()["per_class"] == res.per_class


def test_bad_input_is_reported_with_its_place():
    dets, gts = one_image(G, [0, 0], D, S, [0, 0, 5])
    with pytest.raises(DataError, match=r"detections\[0\]\['labels'\]: labels must be in \[0, 1\)"):
        evaluate_detections(dets, gts, num_classes=1, oriented=False)
    with pytest.raises(DataError, match="oriented=False"):
        evaluate_detections(*one_image(G, [0, 0], [[1, 2, 3, 4, 0]], [0.5], [0]), num_classes=1, oriented=False)
    with pytest.raises(DataError, match=r"ground_truths\[0\]\['labels'\]: expected shape \(2,\)"):
        evaluate_detections(*one_image(G, [0], D, S, [0, 0, 0]), num_classes=1, oriented=False)
    with pytest.raises(DataError, match="2 images but ground truths for 1"):
        evaluate_detections(dets * 2, gts, num_classes=1, oriented=False)
    with pytest.raises(DataError, match="missing key 'scores'"):
        evaluate_detections([{"boxes": D, "labels": [0, 0, 0]}], gts, num_classes=1, oriented=False)


# ---- COCO mode against pycocotools on real annotations -------------------------------------------------------


def load_nepu_boxes() -> list[np.ndarray]:
    """xyxy boxes per image of the NEPU-OWOD VOC fixture (parsed here, independent of rkd.data)."""
    folder = DATA / "nepu_owod" / "Annotations"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")
    images = []
    for path in sorted(folder.glob("*.xml")):
        boxes = []
        for obj in ET.parse(path).getroot().iter("object"):
            bb = obj.find("bndbox")
            boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        images.append(np.array(boxes, dtype=np.float64).reshape(-1, 4))
    return images


def make_eval_set(seed: int):
    """Real GT boxes (a third of the images at quarter resolution, so all COCO sizes occur), 2 classes,
    some crowd; detections = jittered copies of GT with scores, duplicates, misses and false positives."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i, boxes in enumerate(load_nepu_boxes()):
        if i % 3 == 0:
            boxes = boxes / 4
        n = len(boxes)
        labels = rng.integers(0, 2, n)
        crowd = rng.uniform(size=n) < 0.08
        gts.append({"boxes": boxes, "labels": labels, "iscrowd": crowd})
        copies = rng.integers(0, 3, n)  # 0 (missed), 1 or 2 (a duplicate) detections per object
        src = np.repeat(np.arange(n), copies)
        wh = boxes[src, 2:] - boxes[src, :2]
        jitter = rng.normal(0, 0.08, (len(src), 4))
        centre = (boxes[src, :2] + boxes[src, 2:]) / 2 + jitter[:, :2] * wh
        wh = wh * np.exp(jitter[:, 2:])
        det_boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1)
        det_labels = np.where(rng.uniform(size=len(src)) < 0.9, labels[src], 1 - labels[src])
        n_fp = int(rng.integers(0, 4))
        xy = rng.uniform(0, 700, (n_fp, 2))
        fp_boxes = np.concatenate([xy, xy + rng.uniform(5, 150, (n_fp, 2))], 1)
        dets.append(
            {
                "boxes": np.concatenate([det_boxes, fp_boxes]),
                "labels": np.concatenate([det_labels, rng.integers(0, 2, n_fp)]),
                # better-placed boxes tend to score higher, as a detector's would
                "scores": np.r_[
                    np.exp(-np.abs(jitter).sum(1) * 3) * rng.uniform(0.5, 1, len(src)), rng.uniform(0, 0.6, n_fp)
                ],
            }
        )
    return dets, gts


def pycocotools_eval(dets, gts):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (det, gt) in enumerate(zip(dets, gts), start=1):
        images.append({"id": i, "width": 1024, "height": 1024})
        for box, label, crowd in zip(gt["boxes"], gt["labels"], gt["iscrowd"]):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
        for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "score": float(score),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_mode_equals_pycocotools_on_real_boxes(seed):
    dets, gts = make_eval_set(seed)
    ev = pycocotools_eval(dets, gts)
    ours = evaluate_coco(dets, gts, num_classes=2, oriented=False)
    got = [ours.map, ours.map50, ours.map75, ours.map_small, ours.map_medium, ours.map_large]
    np.testing.assert_allclose(got, ev.stats[:6], atol=1e-3)
    np.testing.assert_allclose(got, ev.stats[:6], atol=1e-12)  # in fact identical
    assert 0.2 < ours.map < 0.9, "the synthetic detections should be neither perfect nor hopeless"
    for k in range(2):
        precision = ev.eval["precision"][:, :, k, 0, 2]
        assert ours.per_class[k] == pytest.approx(precision[precision > -1].mean(), abs=1e-12)
    # the same boxes as oriented boxes go through the rotated IoU and give the same numbers
    as_obb = [{**d, "boxes": hbb_to_obb(d["boxes"])} for d in dets]
    gts_obb = [{**g, "boxes": hbb_to_obb(g["boxes"])} for g in gts]
    oriented = evaluate_coco(as_obb, gts_obb, num_classes=2, oriented=True)
    np.testing.assert_allclose([oriented.map, oriented.map50, oriented.map_small], got[:2] + got[3:4], atol=1e-6)


def test_coco_max_dets_keeps_the_highest_scores_per_image_and_class():
    dets, gts = make_eval_set(2)
    few = evaluate_coco(dets, gts, num_classes=2, oriented=False, max_dets=1)
    from pycocotools.cocoeval import Params

    ev = pycocotools_eval(dets, gts)
    assert Params().maxDets[-1] == 100
    # pycocotools' AP at maxDets=1 for area "all" is precision[..., 0, 0]
    p = ev.eval["precision"][:, :, :, 0, 0]
    assert few.map == pytest.approx(p[p > -1].mean(), abs=1e-12)
    assert few.map < evaluate_coco(dets, gts, num_classes=2, oriented=False).map - 0.02


def test_bad_values_name_the_image_key_and_entry():
    box = [50.0, 50.0, 20.0, 10.0, 0.1]
    gts = [{"boxes": np.array([box]), "labels": np.array([0])}] * 2

    def dets(boxes=None, labels=None, scores=None):
        second = {
            "boxes": np.array(boxes or [box, box, box]),
            "labels": np.array(labels or [0, 0, 0]),
            "scores": np.array(scores or [0.9, 0.8, 0.7]),
        }
        return [{"boxes": np.array([box]), "labels": np.array([0]), "scores": np.array([0.5])}, second]

    cases = [
        (
            dets(boxes=[box, box, [50.0, np.nan, 20.0, 10.0, 0.1]]),
            r"detections\[1\]\['boxes'\]: contains NaN.*\(entry 2\)",
        ),
        (dets(labels=[0, 1.5, 0]), r"detections\[1\]\['labels'\]: class labels must be integers \(entry 1\)"),
        (dets(scores=[0.9, 0.8, np.inf]), r"detections\[1\]\['scores'\]: contains NaN or infinite values \(entry 2\)"),
    ]
    for bad, message in cases:
        with pytest.raises(DataError, match=message):
            evaluate_detections(bad, gts, num_classes=2, oriented=True)
    # the clean input scores: ranked TP, FP, FP (duplicates in image 1), TP -> AP 0.5 * 1 + 0.5 * 0.5
    assert evaluate_detections(dets(), gts, num_classes=2, oriented=True).map == pytest.approx(0.75)
