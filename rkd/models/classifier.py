"""Scene classifier: a registered backbone, global average pooling of its last stage, a linear layer.

Built from a model spec of ``kind: classifier`` (validated by
:func:`rkd.models.factory.validate_model_spec`)::

    kind: classifier
    backbone: {name: efficientnet_lite0, width: 1.0, pretrained: true}
    head: {dropout: 0.2}
    resize_to: 224          # optional: the side the input is resized to (bilinear) before the backbone

Inputs are ImageNet-normalised like the detectors' (``rkd.data.dataset.MEAN`` / ``STD``).

``resize_to`` lets a teacher see the scene larger than the data's ``input_size`` its student runs at:
an ImageNet-pretrained backbone recognises objects best near the apparent size it was trained at, and
a small aerial chip upsampled to it scores higher (Touvron et al., "Fixing the train-test resolution
discrepancy", NeurIPS 2019, DOI 10.48550/arXiv.1906.06423, on the effect of apparent object size). The resize is
part of the model, so its FLOPs count, training, evaluation and export all include it. Its feature
maps are then on another grid than a student's at the data's size: KD methods that compare maps
location by location refuse such a pair (:func:`rkd.distill.checks.check_same_grid`); logit methods
(Hinton KD, DKD) do not care.
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
        self.resize_to = (spec or {}).get("resize_to")
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(backbone.out_channels[-1], num_classes)
        self.spec = spec or {}

    @property
    def info(self) -> ClassifierInfo:
        """What classification KD components need to build their parts (channels, strides, classes).

        >>> build_classifier({"backbone": {"width": 0.25}}, num_classes=4).info
        ClassifierInfo(level_channels=(32, 64, 128), strides=(8, 16, 32), num_classes=4, resize_to=None)
        """
        return ClassifierInfo(
            level_channels=tuple(int(c) for c in self.backbone.out_channels),
            strides=tuple(int(s) for s in self.backbone.out_strides),
            num_classes=int(self.num_classes),
            resize_to=self.resize_to,
        )

    def forward(self, images: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        if self.resize_to is not None and images.shape[-2:] != (self.resize_to, self.resize_to):
            size = (self.resize_to, self.resize_to)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
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
