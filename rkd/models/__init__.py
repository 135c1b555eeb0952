"""Models of rkd: backbones, FPN, dense heads, Faster R-CNN, scene classifier, spec validation, FLOPs.

Weights are never loaded at import time; :func:`build_model` builds from a spec.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rkd.models.backbones import BACKBONES, register_backbone
from rkd.models.classifier import Classifier, ClassifierOutput, build_classifier
from rkd.models.coders import HbbCoder, ObbCoder, make_coder
from rkd.models.detector import Detector
from rkd.models.factory import build_detector, validate_model_spec
from rkd.models.faster_rcnn import FasterRCNN, TwoStageOutput
from rkd.models.flops import FlopsReport, count_flops
from rkd.models.latency import measure_latency
from rkd.models.postprocess import decode


def build_model(spec: dict[str, Any] | None, num_classes: int) -> nn.Module:
    """The model of a spec's ``kind`` for ``num_classes`` classes: a scene classifier for
    ``kind: classifier`` (:func:`build_classifier`), else a detector (:func:`build_detector`;
    a spec without ``kind`` is a retinanet).

    >>> type(build_model({"kind": "classifier", "backbone": {"width": 0.25}}, 3)).__name__
    'Classifier'
    """
    if (spec or {}).get("kind") == "classifier":
        return build_classifier(spec, num_classes)
    return build_detector(spec, num_classes)


__all__ = [
    "BACKBONES",
    "Classifier",
    "ClassifierOutput",
    "Detector",
    "FasterRCNN",
    "FlopsReport",
    "HbbCoder",
    "ObbCoder",
    "TwoStageOutput",
    "build_classifier",
    "build_detector",
    "build_model",
    "count_flops",
    "decode",
    "make_coder",
    "measure_latency",
    "register_backbone",
    "validate_model_spec",
]
