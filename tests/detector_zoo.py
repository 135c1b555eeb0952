"""The detector zoo of the KD tests: each variant (RetinaNet and FCOS with oriented or horizontal boxes,
RetinaNet with an angle-classification branch, Faster R-CNN), its model spec and a small batch for it."""

from __future__ import annotations

import torch

from rkd.models import validate_model_spec
from rkd.outputs import Targets

VARIANTS = {
    "retinanet-obb": ("retinanet", "obb", 0),
    "retinanet-obb-angle-bins": ("retinanet", "obb", 8),
    "retinanet-hbb": ("retinanet", "hbb", 0),
    "fcos-obb": ("fcos", "obb", 0),
    "fcos-hbb": ("fcos", "hbb", 0),
    "faster_rcnn-hbb": ("faster_rcnn", "hbb", 0),
}


def model_spec(variant: str, channels: int, convs: int) -> dict:
    kind, boxes, angle_bins = VARIANTS[variant]
    head: dict = {"convs": convs}
    if angle_bins:
        head["angle_bins"] = angle_bins
    return validate_model_spec(
        {
            "kind": kind,
            "boxes": boxes,
            "backbone": {"name": "convnet", "width": 0.25},
            "neck": {"channels": channels},
            "head": head,
        }
    )


def zoo_batch(variant: str) -> tuple[torch.Tensor, Targets]:
    """Two 96 px images with three objects (oriented or horizontal boxes, as the variant predicts)."""
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    if VARIANTS[variant][1] == "obb":
        boxes = [
            torch.tensor([[30.0, 30, 28, 12, 0.3], [70, 60, 20, 10, -0.5]]),
            torch.tensor([[48.0, 48, 40, 20, 1.0]]),
        ]
    else:
        boxes = [torch.tensor([[16.0, 24, 44, 36], [60, 55, 80, 65]]), torch.tensor([[28.0, 38, 68, 58]])]
    return images, Targets(boxes, [torch.tensor([0, 2]), torch.tensor([1])], (96, 96))
