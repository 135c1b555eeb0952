"""Horizontal-box detectors on rkd's data, whose readers give oriented le90 boxes whatever the file held.

They train on the horizontal boxes enclosing the ground truth and are scored against them (DOTA's
HBB task), through the same training forward and validation as oriented detectors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rkd.data.dataset import collate_detection
from rkd.data.synthetic import SyntheticAerial
from rkd.geometry import obb_to_hbb
from rkd.models import build_detector, validate_model_spec
from rkd.outputs import Targets
from rkd.train.evaluate import evaluate


@pytest.mark.parametrize("kind", ["retinanet", "fcos", "faster_rcnn"])
def test_training_forward_encloses_oriented_targets(kind: str) -> None:
    spec = validate_model_spec({"kind": kind, "boxes": "hbb", "backbone": {"width": 0.25}, "neck": {"channels": 16}})
    torch.manual_seed(0)
    det = build_detector(spec, 3).train()
    data = SyntheticAerial(2, 96, num_classes=3, seed=5)
    images, targets, _ = collate_detection([data[i] for i in range(2)])
    assert all(b.shape[-1] == 5 for b in targets.boxes) and any((b[:, 4] != 0).any() for b in targets.boxes)
    enclosed = Targets([obb_to_hbb(b) for b in targets.boxes], targets.labels, targets.image_size)
    torch.manual_seed(1)  # Faster R-CNN samples anchors and RoIs at random
    from_oriented = det(images, targets).losses
    torch.manual_seed(1)
    from_enclosed = det(images, enclosed).losses
    assert set(from_oriented) == set(from_enclosed) and from_oriented
    for name, value in from_oriented.items():
        assert torch.isfinite(value) and value.item() == pytest.approx(from_enclosed[name].item(), rel=1e-6), name


class FixedDetections(nn.Module):
    """A detector stand-in whose ``predict`` returns given detections, batch after batch."""

    def __init__(self, detections: list[dict], box_dim: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluation reads the device from the parameters
        self.detections, self.info = detections, type("Info", (), {"box_dim": box_dim})()
        self.given = 0

    def predict(self, images: torch.Tensor) -> list[dict]:
        out = self.detections[self.given : self.given + len(images)]
        self.given += len(images)
        return out


def test_horizontal_detections_are_scored_against_the_enclosing_boxes() -> None:
    data = SyntheticAerial(6, 128, num_classes=3, seed=2)
    truths = [data[i] for i in range(len(data))]
    assert any((s.boxes[:, 4].abs() > 0.3).any() for s in truths)  # clearly rotated objects

    def dets(boxes_of):
        return [{"boxes": boxes_of(s.boxes), "scores": torch.ones(len(s.boxes)), "labels": s.labels} for s in truths]

    # the enclosing horizontal boxes of every object, found exactly: a perfect HBB detector
    perfect = evaluate(FixedDetections(dets(obb_to_hbb), 4), data, num_classes=3, batch_size=4)
    assert perfect.map == pytest.approx(1.0) and perfect.num_images == 6

    # boxes half as wide about the same centres: IoU 0.5 or less with the enclosing boxes, never matched at 0.5+
    def halved(b):
        h = obb_to_hbb(b)
        cx, w = (h[:, 0] + h[:, 2]) / 2, (h[:, 2] - h[:, 0]) * 0.49
        return torch.stack([cx - w / 2, h[:, 1], cx + w / 2, h[:, 3]], dim=1)

    assert evaluate(FixedDetections(dets(halved), 4), data, num_classes=3, batch_size=4).map == pytest.approx(0.0)
    # oriented detections keep the oriented ground truth
    assert evaluate(FixedDetections(dets(lambda b: b.clone()), 5), data, num_classes=3).map == pytest.approx(1.0)
