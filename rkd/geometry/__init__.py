"""Oriented-box geometry: conversions, exact rotated IoU, exact IoU of quadrilaterals as given, rotated NMS."""

from __future__ import annotations

from rkd.geometry.boxes import (
    CONVENTIONS,
    box_area,
    hbb_iou,
    hbb_to_obb,
    normalize_le90,
    normalize_obb,
    obb_convert,
    obb_to_hbb,
    obb_to_poly,
    poly_to_obb,
)
from rkd.geometry.nms import batched_rotated_nms, rotated_nms
from rkd.geometry.polygon_iou import polygon_iou, polygon_iou_aligned
from rkd.geometry.rotated_iou import rotated_iou, rotated_iou_aligned

__all__ = [
    "CONVENTIONS",
    "batched_rotated_nms",
    "box_area",
    "hbb_iou",
    "hbb_to_obb",
    "normalize_le90",
    "normalize_obb",
    "obb_convert",
    "obb_to_hbb",
    "obb_to_poly",
    "poly_to_obb",
    "polygon_iou",
    "polygon_iou_aligned",
    "rotated_iou",
    "rotated_iou_aligned",
    "rotated_nms",
]
