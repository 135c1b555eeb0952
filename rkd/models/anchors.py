"""Anchor grids and max-IoU label assignment for anchor-based heads.

Anchors of a level are enumerated location-major (row-major ``y, x``), then
anchor ``a = ratio_index * len(scales) + scale_index``, matching
:func:`rkd.outputs.flatten_levels`. Oriented anchors are axis-aligned boxes
written in le90: an anchor taller than wide is ``(cx, cy, h, w, -pi/2)``.
Horizontal anchors are ``(x1, y1, x2, y2)``.

Which anchors an oriented GT box trains is chosen by one of :data:`ASSIGN_RULES`:

* ``rotated`` - exact rotated IoU of the (axis-aligned) anchors with the rotated box.
  A thin box at 45 degrees (a 40 x 16 px car) overlaps axis-aligned anchors poorly
  (best IoU 0.36-0.54 with the default anchors, depending on where it lies), so it
  is mostly positive only at the one anchor it claims.
* ``hbb`` - axis-aligned IoU of the anchors with the GT's circumscribed horizontal
  box: the "RetinaNet-HBB" assignment of rotated RetinaNet (``assign_by_circumhbbox``
  of mmrotate's ``RotatedRetinaHead``; Zhou et al., "MMRotate: A Rotated Object
  Detection Benchmark using PyTorch", ACM MM 2022, DOI 10.1145/3503161.3548541).
  Only which anchors are positive / negative / ignored changes: the regression
  target stays the rotated box.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

from rkd.geometry import obb_to_hbb, rotated_iou
from rkd.outputs import Assignment, Targets

ASSIGN_RULES = ("rotated", "hbb")


def check_assign(assign: str) -> str:
    """``assign`` if it is one of :data:`ASSIGN_RULES`, else ValueError."""
    if assign not in ASSIGN_RULES:
        raise ValueError(f"assign must be one of {', '.join(ASSIGN_RULES)}, got {assign!r}")
    return assign


def anchor_sizes(base: float, ratios: list[float], scales: list[float]) -> Tensor:
    """``(A, 2)`` widths and heights; ``ratio`` is height / width, area ``(base * scale)^2``.

    >>> anchor_sizes(16, [0.5, 1.0, 2.0], [1.0]).round().tolist()
    [[23.0, 11.0], [16.0, 16.0], [11.0, 23.0]]
    """
    sizes = [(base * s / math.sqrt(r), base * s * math.sqrt(r)) for r in ratios for s in scales]
    return torch.tensor(sizes, dtype=torch.float64)


def grid_anchors(height: int, width: int, stride: int, sizes: Tensor, box_dim: int) -> Tensor:
    """All anchors of one level, ``(height * width * A, box_dim)`` float32, centres at ``(i + 0.5) * stride``."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    a = sizes.shape[0]
    cx = cx.reshape(-1, 1).expand(-1, a)
    cy = cy.reshape(-1, 1).expand(-1, a)
    w = sizes[:, 0].expand_as(cx)
    h = sizes[:, 1].expand_as(cx)
    if box_dim == 4:
        out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    else:
        tall = h > w
        angle = torch.where(tall, -math.pi / 2, 0.0)
        out = torch.stack([cx, cy, torch.maximum(w, h), torch.minimum(w, h), angle], dim=-1)
    return out.reshape(-1, box_dim).float()


def pairwise_iou(gt: Tensor, anchors: Tensor, assign: str = "rotated") -> Tensor:
    """IoU ``(G, N)`` of GT boxes and anchors: plain IoU for xyxy; for 5-dim boxes exact rotated
    IoU (``assign="rotated"``) or the IoU of their circumscribed horizontal boxes (``"hbb"``).

    >>> gt = torch.tensor([[0.0, 0.0, 4.0, 2.0, math.pi / 4]], dtype=torch.float64)
    >>> pairwise_iou(gt, torch.tensor([[0.0, 0.0, 3 * 2 ** 0.5, 3 * 2 ** 0.5, 0.0]], dtype=torch.float64), "hbb")
    tensor([[1.]], dtype=torch.float64)
    """
    check_assign(assign)
    if gt.shape[-1] == 4:
        return box_iou(gt, anchors)
    if assign == "hbb":
        # Half extents |w/2 cos| + |h/2 sin|, |w/2 sin| + |h/2 cos| (obb_to_hbb); exact for the
        # anchors too (angle 0 or -pi/2), so this is their own horizontal extent.
        return box_iou(obb_to_hbb(gt), obb_to_hbb(anchors))
    return rotated_iou(gt, anchors)


def assign_max_iou(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    assign: str = "rotated",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RetinaNet assignment of one image, on the IoU of rule ``assign`` (:func:`pairwise_iou`).

    An anchor is positive when its best IoU with any GT is ``>= pos_iou``,
    negative when below ``neg_iou`` and ignored in between. In addition each
    GT's best anchor becomes positive for that GT whenever their IoU is > 0,
    so small or strongly rotated objects always get a positive.

    Returns ``pos, neg, ignore`` (bool ``(N,)``), ``matched_gt`` and
    ``matched_labels`` (long ``(N,)``, -1 where not positive).
    """
    n = anchors.shape[0]
    device = anchors.device
    matched = torch.full((n,), -1, dtype=torch.long, device=device)
    if gt_boxes.shape[0] == 0:
        neg = torch.ones(n, dtype=torch.bool, device=device)
        return ~neg, neg, ~neg, matched, matched.clone()
    iou = pairwise_iou(gt_boxes.to(anchors.dtype), anchors, assign)  # (G, N)
    best_iou, best_gt = iou.max(dim=0)
    pos = best_iou >= pos_iou
    neg = best_iou < neg_iou
    matched = torch.where(pos, best_gt, matched)
    # Each GT claims its best anchor (later GTs win the rare ties, as with any scatter).
    gt_best_iou, gt_best_anchor = iou.max(dim=1)
    has = gt_best_iou > 0
    claim = gt_best_anchor[has]
    matched[claim] = torch.arange(gt_boxes.shape[0], device=device)[has]
    pos[claim] = True
    neg[claim] = False
    ignore = ~(pos | neg)
    labels = torch.where(pos, gt_labels.to(device)[matched.clamp(min=0)], torch.full_like(matched, -1))
    return pos, neg, ignore, matched, labels


def assign_batch(
    anchors: Tensor, targets: Targets, pos_iou: float = 0.5, neg_iou: float = 0.4, assign: str = "rotated"
) -> Assignment:
    """:func:`assign_max_iou` for each image; ``anchors`` are the flattened ``(N, box_dim)`` of all levels.

    The target box of a positive is its GT box whatever the rule (the rotated box for ``hbb``).
    """
    per_image = []
    for boxes, labels in zip(targets.boxes, targets.labels):
        boxes = boxes.to(anchors.device)
        pos, neg, ignore, matched, mlabels = assign_max_iou(anchors, boxes, labels, pos_iou, neg_iou, assign)
        target = anchors.new_zeros(anchors.shape)
        if boxes.shape[0]:
            target = torch.where(pos[:, None], boxes.to(anchors.dtype)[matched.clamp(min=0)], target)
        per_image.append((pos, neg, ignore, matched, mlabels, target))
    cols = [torch.stack(c) for c in zip(*per_image)]
    return Assignment(*cols)
