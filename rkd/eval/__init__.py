"""Detection evaluation: VOC/DOTA and COCO-style mAP for oriented or horizontal boxes, prediction files.

The names below load their module on first use (PEP 562), so ``rkd.eval.cli`` can declare the
``rkd evaluate`` command without importing torch (``rkd predict`` runs where torch is absent).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "CocoResult": "rkd.eval.map",
    "MapResult": "rkd.eval.map",
    "evaluate_coco": "rkd.eval.map",
    "evaluate_detections": "rkd.eval.map",
    "read_dota_task1": "rkd.eval.predictions",
    "read_json_predictions": "rkd.eval.predictions",
    "write_dota_task1": "rkd.eval.predictions",
    "write_json_predictions": "rkd.eval.predictions",
}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'rkd.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
