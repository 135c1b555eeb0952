"""The networks ``rkd export`` writes: end-to-end detectors, raw heads, classifier logits
(:func:`inference_network` picks a model's, :func:`network_output_names` names its outputs).

:class:`DetectionNetwork` (the default export of a detector) ends in detections:

* oriented boxes: ``images (B, 3, S, S) -> boxes (B, M, 5) le90, scores (B, M), labels (B, M)``,
  the ``pre_nms_top_k`` best (location, anchor, class) scores of each level, decoded. Rotated NMS
  and the score threshold are left to ``postprocess.py`` (shipped beside the model), because
  ONNX has no rotated NMS.
* horizontal boxes: ``images -> boxes (D, 4) xyxy, scores (D,), labels (D,), batch_index (D,)``:
  the same candidates through ONNX's ``NonMaxSuppression`` (class-wise), ``D`` the kept boxes of
  the whole batch; ``score_threshold`` and ``iou_threshold`` are graph inputs the caller gives
  (``postprocess.inputs()`` builds them; ONNX defaults made onnxruntime warn on every load).

Both reproduce :func:`rkd.models.postprocess.decode`: per level the top-k of
``sigmoid(cls)`` (times centerness under a square root for FCOS), decoded by the head's own
``decode_boxes`` against the same anchors, which are constants of the fixed input size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from rkd.models import Classifier
from rkd.models.detector import Detector
from rkd.outputs import DetectorInfo

PRE_NMS_TOP_K = 1000  # as rkd.models.postprocess.decode
MAX_PER_IMAGE = 300
DEFAULT_SCORE = 0.05
DEFAULT_IOU = 0.1


class RawNetwork(nn.Module):
    """The detector's network alone: ``images -> (cls_0.., box_0.., [centerness_0..], [angle_0..])``.

    A flat tuple of tensors so exporters see plain outputs (``--raw``).
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        d = self.detector
        head_out = d.head(d.neck(d.backbone(images)))
        extras = head_out[2] if len(head_out) > 2 else {}
        outs = list(head_out[0]) + list(head_out[1])
        for key in ("centerness", "angle_logits"):
            outs += list(extras.get(key) or [])
        return tuple(outs)


class LogitsNetwork(nn.Module):
    """The classifier's class logits alone: ``images (B, 3, S, S) -> logits (B, K)``.

    :class:`~rkd.models.Classifier` returns features and the pooled vector too (for KD);
    deployment needs only the logits, as one plain tensor.
    """

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images).logits


class _OnnxNms(torch.autograd.Function):
    """Class-wise NMS of ``boxes (B, M, 4)`` and ``scores (B, K, M)``: ``(D, 3)`` [batch, class, box].

    In torch it runs torchvision's NMS; exported, it is ONNX's ``NonMaxSuppression`` (same rule:
    suppress at IoU > threshold, keep scores > score threshold).
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: Tensor, iou: Tensor, score: Tensor) -> Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            for k in range(scores.shape[1]):
                ok = (scores[b, k] > score).nonzero(as_tuple=True)[0]
                keep = ok[batched_nms(boxes[b, ok], scores[b, k, ok], torch.zeros_like(ok), float(iou))]
                keep = keep[: int(max_per_class)]
                rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, k), keep], dim=1))
        return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou, score):  # noqa: ANN001 - the exporter's graph values
        return g.op("NonMaxSuppression", boxes, scores, max_per_class, iou, score, center_point_box_i=0)


def output_names(info: DetectorInfo) -> list[str]:
    """Names of :class:`DetectionNetwork`'s outputs, in order."""
    if info.oriented:
        return ["boxes", "scores", "labels"]
    return ["boxes", "scores", "labels", "batch_index"]


def raw_output_names(info: DetectorInfo) -> list[str]:
    """Names of :class:`RawNetwork`'s outputs, in order; ``_i`` is the level, finest (stride 8) first.

    ``cls_logits_i (B, A*K, H_i, W_i)``, then ``box_regs_i (B, A*D, H_i, W_i)``
    (encoded deltas, anchor-major channels as in :mod:`rkd.outputs`), then
    ``centerness_i (B, A, H_i, W_i)`` for FCOS heads, then
    ``angle_logits_i (B, A*bins, H_i, W_i)`` when the head has an angle branch.

    >>> raw_output_names(DetectorInfo((8, 8), (8, 16), 3, 9, 5))
    ['cls_logits_0', 'cls_logits_1', 'box_regs_0', 'box_regs_1']
    """
    levels = range(len(info.strides))
    names = [f"cls_logits_{i}" for i in levels] + [f"box_regs_{i}" for i in levels]
    if info.has_centerness:
        names += [f"centerness_{i}" for i in levels]
    if info.angle_bins:
        names += [f"angle_logits_{i}" for i in levels]
    return names


class DetectionNetwork(nn.Module):
    """``images (B, 3, size, size)`` -> detections (see module doc); ``nms=False`` stops before NMS."""

    def __init__(
        self,
        detector: Detector,
        size: int,
        pre_nms_top_k: int = PRE_NMS_TOP_K,
        max_per_image: int = MAX_PER_IMAGE,
        nms: bool = True,
    ) -> None:
        super().__init__()
        self.detector, self.size = detector, size
        self.pre_nms_top_k, self.max_per_image = pre_nms_top_k, max_per_image
        self.nms = nms and not detector.info.oriented
        with torch.no_grad():
            features = detector.neck(detector.backbone(torch.zeros(1, 3, size, size)))
        # The anchors (points for FCOS) of this input size: constants of the graph.
        for i, anchors in enumerate(detector.head.anchors(features, detector.info.strides)):
            self.register_buffer(f"anchors_{i}", anchors.clone(), persistent=False)

    def candidates(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image the top-k (anchor, class) scores of each level, decoded: boxes, scores, labels."""
        d, info = self.detector, self.detector.info
        a, k, dim = info.num_anchors, info.num_classes, info.box_dim
        head_out = d.head(d.neck(d.backbone(images)))
        extras = head_out[2] if len(head_out) > 2 else {}
        centerness = extras.get("centerness")
        boxes, scores, labels = [], [], []
        for lvl, (cls_map, box_map) in enumerate(zip(head_out[0], head_out[1])):
            batch = cls_map.shape[0]
            # (B, A*K, H, W) -> (B, H*W*A*K): location-major, then anchor, then class, as decode's view.
            prob = cls_map.reshape(batch, a, k, -1).permute(0, 3, 1, 2).reshape(batch, -1).sigmoid()
            if centerness is not None:
                ctr = centerness[lvl].reshape(batch, a, -1).permute(0, 2, 1).reshape(batch, -1, 1).sigmoid()
                prob = (prob.reshape(batch, -1, k) * ctr).sqrt().reshape(batch, -1)
            top, index = prob.topk(min(self.pre_nms_top_k, prob.shape[1]), dim=1)
            anchor_idx, label = index // k, index % k
            deltas = box_map.reshape(batch, a, dim, -1).permute(0, 3, 1, 2).reshape(batch, -1, dim)
            deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, dim))
            anchors = getattr(self, f"anchors_{lvl}")[anchor_idx]
            boxes.append(d.head.decode_boxes(deltas, anchors, info.strides[lvl]))
            scores.append(top)
            labels.append(label)
        return torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)

    def forward(
        self, images: Tensor, score_threshold: Tensor | None = None, iou_threshold: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        boxes, scores, labels = self.candidates(images)
        if not self.nms:
            return boxes, scores, labels
        score_threshold = torch.tensor([DEFAULT_SCORE]) if score_threshold is None else score_threshold
        iou_threshold = torch.tensor([DEFAULT_IOU]) if iou_threshold is None else iou_threshold
        k = self.detector.info.num_classes
        # One score row per class, the candidate's score in its own class only (0 elsewhere, which
        # no threshold >= 0 keeps), so NMS within a row is rkd's class-wise NMS.
        own = labels[:, None, :] == torch.arange(k, device=labels.device)[None, :, None]
        per_class = torch.where(own, scores[:, None, :], torch.zeros_like(scores[:, None, :]))
        cap = torch.tensor([self.max_per_image], dtype=torch.long)
        picked = _OnnxNms.apply(boxes, per_class, cap, iou_threshold, score_threshold)
        batch_index, box_index = picked[:, 0], picked[:, 2]
        flat = batch_index * boxes.shape[1] + box_index
        return (boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat], labels.reshape(-1)[flat], batch_index)


def inference_network(model: Detector | Classifier, size: int, raw: bool = False) -> nn.Module:
    """What the ONNX / .pt2 / TorchScript files hold for ``model`` (see the module doc)."""
    if isinstance(model, Classifier):
        return LogitsNetwork(model)
    return RawNetwork(model) if raw else DetectionNetwork(model, size)


def network_output_names(network: nn.Module) -> list[str]:
    if isinstance(network, LogitsNetwork):
        return ["logits"]
    if isinstance(network, RawNetwork):
        return raw_output_names(network.detector.info)
    return output_names(network.detector.info)
