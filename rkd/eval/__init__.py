"""Detection evaluation: VOC/DOTA and COCO-style mAP for oriented or horizontal boxes, prediction files."""

from __future__ import annotations

from rkd.eval.map import CocoResult, MapResult, evaluate_coco, evaluate_detections
from rkd.eval.predictions import (
    read_dota_task1,
    read_json_predictions,
    write_dota_task1,
    write_json_predictions,
)

__all__ = [
    "CocoResult",
    "MapResult",
    "evaluate_coco",
    "evaluate_detections",
    "read_dota_task1",
    "read_json_predictions",
    "write_dota_task1",
    "write_json_predictions",
]
