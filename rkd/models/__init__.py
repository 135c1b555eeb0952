"""Models of rkd: backbones, FPN, dense heads, Faster R-CNN, scene classifier, spec validation, FLOPs.

Weights are never loaded at import time; ``build_detector`` builds from a spec.
"""

from __future__ import annotations

from rkd.models.backbones import BACKBONES, register_backbone
from rkd.models.classifier import Classifier, ClassifierOutput, build_classifier
from rkd.models.coders import HbbCoder, ObbCoder, make_coder
from rkd.models.detector import Detector
from rkd.models.factory import build_detector, validate_model_spec
from rkd.models.faster_rcnn import FasterRCNN, TwoStageOutput
from rkd.models.flops import FlopsReport, count_flops
from rkd.models.latency import measure_latency
from rkd.models.postprocess import decode

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
    "count_flops",
    "decode",
    "make_coder",
    "measure_latency",
    "register_backbone",
    "validate_model_spec",
]
