"""The detector: backbone -> FPN -> dense head, returning :class:`rkd.outputs.DetectorOutput`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rkd.geometry import obb_to_hbb
from rkd.models.postprocess import decode
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def own_targets(targets: Targets | None, box_dim: int) -> Targets | None:
    """``targets`` in a detector's box kind. rkd's readers give le90 ``(N, 5)`` boxes whatever the
    file held; a horizontal-box detector (``box_dim`` 4) trains on the horizontal boxes enclosing
    them, as DOTA's HBB task defines its ground truth. Other targets are returned as they are.

    >>> t = own_targets(Targets([torch.tensor([[10.0, 10.0, 4.0, 2.0, 1.5707963]])], [torch.tensor([0])], (32, 32)), 4)
    >>> [round(v, 4) for v in t.boxes[0][0].tolist()]
    [9.0, 8.0, 11.0, 12.0]
    """
    if targets is None or box_dim != 4 or all(b.shape[-1] == 4 for b in targets.boxes):
        return targets
    boxes = [obb_to_hbb(b).to(b.dtype) if b.shape[-1] == 5 else b for b in targets.boxes]
    return Targets(boxes, targets.labels, targets.image_size)


class Detector(nn.Module):
    """A one-stage detector assembled from a backbone, a neck and a head.

    The head provides ``forward(features) -> (cls_logits, box_regs, extras)``
    (extras: optional ``centerness`` / ``angle_logits`` per level),
    ``anchors(features, strides)``, ``decode_boxes(deltas, anchors, stride)``,
    ``loss(output, targets) -> (assignment, losses)`` and the attributes
    ``num_classes``, ``num_anchors``, ``box_dim`` (``has_centerness``, ``angle_bins``).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module, spec: dict[str, Any] | None = None):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.spec = spec or {}
        strides = list(backbone.out_strides)
        while len(strides) < neck.levels:
            strides.append(strides[-1] * 2)
        self._info = DetectorInfo(
            level_channels=(neck.channels,) * neck.levels,
            strides=tuple(strides),
            num_classes=head.num_classes,
            num_anchors=head.num_anchors,
            box_dim=head.box_dim,
            has_centerness=getattr(head, "has_centerness", False),
            angle_bins=getattr(head, "angle_bins", 0),
        )

    @property
    def info(self) -> DetectorInfo:
        return self._info

    def forward(self, images: Tensor, targets: Targets | None = None) -> DetectorOutput:
        targets = own_targets(targets, self._info.box_dim)
        features = self.neck(self.backbone(images))
        head_out = self.head(features)
        cls_logits, box_regs = head_out[0], head_out[1]
        extras = head_out[2] if len(head_out) > 2 else {}
        out = DetectorOutput(
            info=self._info,
            features=features,
            cls_logits=cls_logits,
            box_regs=box_regs,
            anchors=self.head.anchors(features, self._info.strides),
            image_size=(images.shape[-2], images.shape[-1]),
            centerness=extras.get("centerness"),
            angle_logits=extras.get("angle_logits"),
            head_fn=self.head_fn,
            inputs=images,
        )
        if targets is not None:
            out.assignment, out.losses = self.head.loss(out, targets)
        return out

    def head_fn(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The head as a function of FPN features -> ``(cls_logits, box_regs)``."""
        out = self.head(features)
        return out[0], out[1]

    @torch.no_grad()
    def predict(self, images: Tensor, **decode_kwargs: Any) -> list[dict[str, Tensor]]:
        """Forward in eval mode and decode; see :func:`rkd.models.postprocess.decode` for the kwargs."""
        was_training = self.training
        self.eval()
        try:
            return decode(self(images), box_decoder=self.head.decode_boxes, **decode_kwargs)
        finally:
            self.train(was_training)
