"""Scene classifier: a registered backbone, global average pooling of its last stage, a linear layer.

Built from a model spec of ``kind: classifier`` (validated by
:func:`rkd.models.factory.validate_model_spec`)::

    kind: classifier
    backbone: {name: efficientnet_lite0, width: 1.0, pretrained: true}
    head: {dropout: 0.2}

Inputs are ImageNet-normalised like the detectors' (``rkd.data.dataset.MEAN`` / ``STD``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.errors import SpecError
from rkd.models.factory import build_backbone, validate_model_spec
from rkd.outputs import ClassifierInfo, ClassifierOutput

__all__ = ["Classifier", "ClassifierInfo", "ClassifierOutput", "build_classifier"]


class Classifier(nn.Module):
    """``backbone -> mean over H, W of the last map -> dropout -> linear``."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0, spec: dict[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(backbone.out_channels[-1], num_classes)
        self.spec = spec or {}

    @property
    def info(self) -> ClassifierInfo:
        """What classification KD components need to build their parts (channels, strides, classes).

        >>> build_classifier({"backbone": {"width": 0.25}}, num_classes=4).info
        ClassifierInfo(level_channels=(32, 64, 128), strides=(8, 16, 32), num_classes=4)
        """
        return ClassifierInfo(
            level_channels=tuple(int(c) for c in self.backbone.out_channels),
            strides=tuple(int(s) for s in self.backbone.out_strides),
            num_classes=int(self.num_classes),
        )

    def forward(self, images: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        features = self.backbone(images)
        pooled = features[-1].mean(dim=(2, 3))
        logits = self.fc(self.dropout(pooled))
        out = ClassifierOutput(features=features, pooled=pooled, logits=logits)
        if labels is not None:
            out.losses = {"cls": F.cross_entropy(logits, labels)}
        return out

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class probabilities ``(B, num_classes)`` in eval mode (the train/eval mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            return self(images).logits.softmax(dim=-1)
        finally:
            self.train(was_training)


def build_classifier(spec: dict[str, Any] | None, num_classes: int) -> Classifier:
    """Validate a ``kind: classifier`` spec and build it for ``num_classes`` classes.

    >>> clf = build_classifier({"kind": "classifier", "backbone": {"width": 0.25}}, num_classes=5)
    >>> clf(torch.zeros(2, 3, 64, 64)).logits.shape
    torch.Size([2, 5])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = validate_model_spec({"kind": "classifier", **(spec or {})})
    if spec["kind"] != "classifier":
        raise SpecError("kind", f"build_classifier needs kind: classifier, got {spec['kind']}")
    return Classifier(build_backbone(spec["backbone"]), num_classes, spec["head"]["dropout"], spec=spec)
