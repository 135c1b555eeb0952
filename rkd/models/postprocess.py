"""Turn a :class:`~rkd.outputs.DetectorOutput` into per-image detections."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from rkd.geometry import batched_rotated_nms
from rkd.models.coders import make_coder
from rkd.outputs import DetectorOutput


def decode(
    output: DetectorOutput,
    score_threshold: float = 0.05,
    nms_iou: float = 0.1,
    max_per_image: int = 300,
    pre_nms_top_k: int = 1000,
    box_decoder: Callable[[Tensor, Tensor, int], Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """Detections of each image: ``{"boxes": (M, box_dim), "scores": (M,), "labels": (M,)}``.

    Per level, the ``pre_nms_top_k`` best (anchor, class) scores above
    ``score_threshold`` are decoded; then class-wise NMS (exact rotated IoU for
    oriented boxes) runs over all levels and the best ``max_per_image`` are kept,
    highest score first. Scores are ``sigmoid(cls)``, times ``sigmoid(centerness)``
    under a square root when the head predicts centerness.

    ``box_decoder(deltas (M, D), anchors (M, D), stride) -> boxes`` defaults to
    the anchor coder of :mod:`rkd.models.coders` (RetinaNet); anchor-free
    heads pass their own (``Detector.predict`` always passes the head's).
    """
    info = output.info
    a, k, d = info.num_anchors, info.num_classes, info.box_dim
    if box_decoder is None:
        coder = make_coder(d)

        def box_decoder(deltas: Tensor, anchors: Tensor, stride: int) -> Tensor:
            return coder.decode(deltas, anchors)

    results = []
    for i in range(output.cls_logits[0].shape[0]):
        boxes, scores, labels = [], [], []
        for lvl, (cls_map, box_map, anchors) in enumerate(zip(output.cls_logits, output.box_regs, output.anchors)):
            prob = cls_map[i].view(a, k, -1).permute(2, 0, 1).reshape(-1).sigmoid()  # (H*W*A*K,)
            if output.centerness is not None:
                ctr = output.centerness[lvl][i].view(a, -1).permute(1, 0).reshape(-1).sigmoid()
                prob = (prob.view(-1, k) * ctr[:, None]).sqrt().reshape(-1)
            keep = (prob > score_threshold).nonzero(as_tuple=True)[0]
            if keep.numel() > pre_nms_top_k:
                keep = keep[prob[keep].topk(pre_nms_top_k).indices]
            anchor_idx, label = keep // k, keep % k
            deltas = box_map[i].view(a, d, -1).permute(2, 0, 1).reshape(-1, d)[anchor_idx]
            boxes.append(box_decoder(deltas, anchors[anchor_idx], info.strides[lvl]))
            scores.append(prob[keep])
            labels.append(label)
        boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        nms = batched_rotated_nms if d == 5 else batched_nms
        keep = nms(boxes_t.float(), scores_t.float(), labels_t, nms_iou)
        keep = keep[scores_t[keep].argsort(descending=True)][:max_per_image]
        results.append({"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep]})
    return results
