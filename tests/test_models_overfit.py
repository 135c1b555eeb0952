"""End-to-end agreement of detector, loss, decoding and evaluation: overfit a few synthetic images.

If the assignment, the box coder, the flatten order or the decoding disagreed
with each other (or with rkd.eval's matching), the mAP on the training images
would stay far below 0.9 however long the detector trains.
"""

from __future__ import annotations

import pytest
import torch

from rkd.data.dataset import collate_detection
from rkd.data.synthetic import SyntheticAerial
from rkd.eval import evaluate_detections
from rkd.geometry import obb_to_hbb
from rkd.models import build_detector
from rkd.outputs import Targets

SMALL = {"backbone": {"width": 0.25}, "neck": {"channels": 32}}


def overfit(spec: dict, num_classes: int = 3, size: int = 160, steps: int = 200, seed: int = 1):
    """Train on 4 images with Adam; return the mAP50 on them, the first and the last losses, the last output."""
    torch.manual_seed(seed)
    data = SyntheticAerial(4, size, num_classes=num_classes, seed=seed)
    images, targets, _ = collate_detection([data[i] for i in range(len(data))])
    oriented = spec.get("boxes", "obb") == "obb"
    if not oriented:
        targets = Targets([obb_to_hbb(b) for b in targets.boxes], targets.labels, targets.image_size)
    det = build_detector(spec, num_classes=num_classes)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    first = None
    for _ in range(steps):
        out = det(images, targets)
        first = first or {k: v.item() for k, v in out.losses.items()}
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
    preds = det.predict(images)
    gts = [{"boxes": b, "labels": lab} for b, lab in zip(targets.boxes, targets.labels)]
    result = evaluate_detections(preds, gts, num_classes=num_classes, iou_threshold=0.5, oriented=oriented)
    return result, first, {k: v.item() for k, v in out.losses.items()}, out


# FCOS has no anchors near each object to share the work, so it takes a few more steps.
@pytest.mark.parametrize(
    "extra, steps, loss_names",
    [
        ({}, 200, {"cls", "box"}),
        ({"boxes": "hbb"}, 200, {"cls", "box"}),
        ({"head": {"angle_bins": 36}}, 200, {"cls", "box", "angle"}),
        ({"kind": "fcos"}, 300, {"cls", "box", "centerness"}),
        ({"kind": "fcos", "boxes": "hbb"}, 300, {"cls", "box", "centerness"}),
        ({"kind": "fcos", "head": {"angle_bins": 36}}, 300, {"cls", "box", "centerness", "angle"}),
    ],
    ids=["retinanet-obb", "retinanet-hbb", "retinanet-obb-csl", "fcos-obb", "fcos-hbb", "fcos-obb-csl"],
)
def test_detector_overfits_four_images(extra, steps, loss_names):
    result, first, last, out = overfit({**SMALL, **extra}, steps=steps)
    assert set(out.losses) == loss_names
    # classification and box losses collapse (centerness and CSL keep their targets' entropy)
    assert last["cls"] < 0.05 * first["cls"] and last["box"] < 0.05 * first["box"]
    assert len(result.per_class) == 3
    assert result.map > 0.9, result.per_class
