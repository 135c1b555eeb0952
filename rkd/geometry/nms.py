"""Greedy non-maximum suppression for oriented boxes.

Greedy NMS keeps box i (in descending score order) unless an earlier *kept*
box overlaps it with IoU > threshold. The boxes are processed in blocks of
the score order: boxes suppressed by kept boxes of earlier blocks are removed
with one matrix product, then the dependencies inside the block are resolved
by iterating ``keep = not any(kept earlier & overlaps)`` to its fixed point.
That fixed point is unique (each box depends only on higher-scored ones), so
it equals the sequential greedy result, with no Python loop over boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rkd.geometry.boxes import as_tensor
from rkd.geometry.rotated_iou import rotated_iou

_BLOCK = 256


def _greedy_keep(overlaps: Tensor) -> Tensor:
    """Greedy keep mask (N,) given ``overlaps`` (N, N): box j suppresses box i > j where overlaps[j, i]."""
    n = overlaps.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=overlaps.device)
    for b0 in range(0, n, _BLOCK):
        block = slice(b0, min(n, b0 + _BLOCK))
        # Suppression by boxes kept in earlier blocks (already final).
        alive = ~(overlaps[:b0, block] & keep[:b0, None]).any(0)
        inner = overlaps[block, block].triu(1).to(torch.float32)  # float so the fixed point can use matmul
        block_keep = alive
        while True:
            updated = alive & ((block_keep.to(torch.float32) @ inner) == 0)
            if torch.equal(updated, block_keep):
                break
            block_keep = updated
        keep[block] = block_keep
    return keep


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices (LongTensor, by descending score) of the boxes (N, 5) that greedy NMS keeps.

    A box is suppressed when its IoU with a kept, higher-scored box is > ``iou_threshold``.

    >>> boxes = torch.tensor([[0.0, 0, 10, 4, 0], [1.0, 0, 10, 4, 0], [30.0, 0, 10, 4, 0]])
    >>> rotated_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    tensor([0, 2])
    """
    return batched_rotated_nms(boxes, scores, None, iou_threshold)


def batched_rotated_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None, iou_threshold: float) -> Tensor:
    """Like :func:`rotated_nms`, but boxes only suppress boxes with the same label.

    >>> boxes = torch.tensor([[0.0, 0, 10, 4, 0], [1.0, 0, 10, 4, 0]])
    >>> batched_rotated_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    tensor([0, 1])
    """
    boxes, scores = as_tensor(boxes), as_tensor(scores)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must have shape (N, 5), got {tuple(boxes.shape)}")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    order = scores.argsort(descending=True, stable=True)
    if order.numel() == 0:
        return order
    sorted_boxes = boxes[order]
    n = sorted_boxes.shape[0]
    overlaps = torch.empty(n, n, dtype=torch.bool, device=boxes.device)
    for r0 in range(0, n, _BLOCK):  # row blocks keep the float IoU matrix out of memory
        overlaps[r0 : r0 + _BLOCK] = rotated_iou(sorted_boxes[r0 : r0 + _BLOCK], sorted_boxes) > iou_threshold
    if labels is not None:
        labels = torch.as_tensor(labels, device=boxes.device)
        if labels.shape != (boxes.shape[0],):
            raise ValueError(f"labels must have shape ({boxes.shape[0]},), got {tuple(labels.shape)}")
        sorted_labels = labels[order]
        overlaps &= sorted_labels[:, None] == sorted_labels[None, :]
    return order[_greedy_keep(overlaps)]
