"""FCOS-style anchor-free head for oriented (le90) or horizontal boxes, with centerness.

Every feature-map location is a point ``((x + 0.5) * s, (y + 0.5) * s)``. A
point is positive for a GT box when it lies inside the box and its largest
side distance falls in its level's range (up to 8 strides, the last level
unbounded); a point inside several boxes takes the smallest one. A GT that
gets no point this way (thin or tiny objects) claims the point nearest its
centre on the level its size belongs to, with centerness target 1.

Box regressions are the distances ``(l, t, r, b)`` from the point to the four
sides, in strides, measured in the box's own frame, plus for oriented boxes
the le90 angle itself: ``(l, t, r, b[, angle])``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from rkd.geometry import normalize_le90
from rkd.models.angle_cls import csl_targets
from rkd.models.retinanet import conv_tower
from rkd.outputs import Assignment, DetectorOutput, Targets, flatten_levels

SIZE_OF_INTEREST = 8  # a level takes objects whose largest side distance is <= this many strides


def level_ranges(strides: tuple[int, ...]) -> list[tuple[float, float]]:
    """``(low, high]`` range of the largest side distance (pixels) each level is responsible for.

    >>> level_ranges((8, 16, 32))
    [(0.0, 64.0), (64.0, 128.0), (128.0, inf)]
    """
    highs = [float(SIZE_OF_INTEREST * s) for s in strides[:-1]] + [math.inf]
    return list(zip([0.0, *highs[:-1]], highs))


def side_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances ``(..., 4)`` = ``(l, t, r, b)`` from points ``(..., 2)`` to the sides of boxes ``(..., 5)``.

    Shapes broadcast (``points[None]`` with ``boxes[:, None]`` gives all pairs).
    Distances are measured along the box's own axes; all four are positive
    exactly when the point is inside the box.

    >>> d = side_distances(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0, math.pi / 2]]))
    >>> [round(x, 4) for x in d[0].tolist()]  # w runs along +y here, so the point is 1 px off the h-centre
    [2.0, 0.0, 2.0, 2.0]
    """
    cx, cy, w, h, a = boxes.unbind(-1)
    dx, dy = points[..., 0] - cx, points[..., 1] - cy
    cos, sin = torch.cos(a), torch.sin(a)
    u = dx * cos + dy * sin  # along w
    v = -dx * sin + dy * cos  # along h
    return torch.stack([w / 2 + u, h / 2 + v, w / 2 - u, h / 2 - v], dim=-1)


def xyxy_as_obb(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` as ``(cx, cy, w, h, 0)``: angle 0 keeps l/t/r/b on the image axes (not le90)."""
    return torch.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
            torch.zeros_like(boxes[:, 0]),
        ],
        dim=-1,
    )


def centerness_target(dist: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of ``(..., 4)`` distances.

    >>> centerness_target(torch.tensor([[2.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 2.0]])).tolist()
    [0.5773502588272095, 0.5773502588272095]
    """
    lr, tb = dist[..., 0::2].clamp(min=0), dist[..., 1::2].clamp(min=0)
    ratio_lr = lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)
    ratio_tb = tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    return torch.sqrt(ratio_lr * ratio_tb)


class FCOSHead(nn.Module):
    """Classification, box and centerness outputs shared over levels (one point per location)."""

    has_centerness = True
    num_anchors = 1

    def __init__(
        self,
        channels: int,
        num_classes: int,
        box_dim: int = 5,
        convs: int = 2,
        angle_bins: int = 0,
        prior: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if angle_bins and box_dim != 5:
            raise ValueError("angle_bins needs oriented boxes (box_dim 5)")
        self.num_classes, self.box_dim, self.angle_bins = num_classes, box_dim, angle_bins
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_tower = conv_tower(channels, convs)
        self.box_tower = conv_tower(channels, convs)
        self.cls_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(channels, box_dim, 3, padding=1)
        self.centerness_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.angle_out = nn.Conv2d(channels, angle_bins, 3, padding=1) if angle_bins else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        bias = -math.log((1 - prior) / prior)
        nn.init.constant_(self.cls_out.bias, bias)
        if self.angle_out is not None:
            nn.init.constant_(self.angle_out.bias, bias)
        # Initial side distances of one stride, so early boxes are small but not degenerate.
        nn.init.constant_(self.box_out.bias[:4], 1.0)
        self._point_cache: dict[tuple, list[Tensor]] = {}

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        cls = [self.cls_out(self.cls_tower(f)) for f in features]
        box_feats = [self.box_tower(f) for f in features]
        extras = {"centerness": [self.centerness_out(f) for f in box_feats]}
        if self.angle_out is not None:
            extras["angle_logits"] = [self.angle_out(f) for f in box_feats]
        return cls, [self.box_out(f) for f in box_feats], extras

    def anchors(self, features: list[Tensor], strides: tuple[int, ...]) -> list[Tensor]:
        """Zero-size boxes at the points of each level: ``(H*W, box_dim)``."""
        shapes = tuple(tuple(f.shape[-2:]) for f in features)
        key = (shapes, strides, features[0].device)
        if key not in self._point_cache:
            levels = []
            for (h, w), s in zip(shapes, strides):
                ys = (torch.arange(h, dtype=torch.float32) + 0.5) * s
                xs = (torch.arange(w, dtype=torch.float32) + 0.5) * s
                py, px = (t.reshape(-1) for t in torch.meshgrid(ys, xs, indexing="ij"))
                zeros = torch.zeros_like(px)
                pts = torch.stack([px, py, zeros, zeros, zeros] if self.box_dim == 5 else [px, py, px, py], dim=-1)
                levels.append(pts.to(features[0].device))
            self._point_cache[key] = levels
        return self._point_cache[key]

    def encode_boxes(self, points: Tensor, boxes: Tensor, stride: Tensor | float) -> Tensor:
        """Regression targets ``(P, box_dim)`` of boxes (le90 or xyxy) seen from their points ``(P, 2)``."""
        obb = boxes if self.box_dim == 5 else xyxy_as_obb(boxes)
        stride = torch.as_tensor(stride, dtype=boxes.dtype, device=boxes.device)
        target = side_distances(points, obb) / (stride[:, None] if stride.ndim else stride)
        return torch.cat([target, obb[:, 4:5]], dim=1) if self.box_dim == 5 else target

    def decode_boxes(self, deltas: Tensor, anchors: Tensor, stride: float) -> Tensor:
        """Boxes from ``(l, t, r, b[, angle])`` (in strides) at the points ``anchors[:, :2]``."""
        px, py = anchors[..., 0], anchors[..., 1]
        left, top, right, bottom = (deltas[..., :4] * stride).unbind(-1)
        if self.box_dim == 4:
            return torch.stack([px - left, py - top, px + right, py + bottom], dim=-1)
        a = deltas[..., 4]
        ou, ov = (right - left) / 2, (bottom - top) / 2  # box centre from the point, in the box frame
        cos, sin = torch.cos(a), torch.sin(a)
        boxes = torch.stack(
            [
                px + ou * cos - ov * sin,
                py + ou * sin + ov * cos,
                (left + right).clamp(min=0),
                (top + bottom).clamp(min=0),
                a,
            ],
            dim=-1,
        )
        return normalize_le90(boxes.reshape(-1, 5)).reshape(boxes.shape)

    def assign(self, points: Tensor, level: Tensor, ranges: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Matched GT per point (-1: negative) and a mask of fallback points, for one image.

        ``level`` is each point's level index, ``ranges`` ``(levels, 2)`` the
        levels' side-distance ranges, ``boxes`` ``(G, 5)`` oriented GT.
        """
        n = points.shape[0]
        matched = torch.full((n,), -1, dtype=torch.long, device=points.device)
        fallback = torch.zeros(n, dtype=torch.bool, device=points.device)
        if boxes.shape[0] == 0:
            return matched, fallback
        dist = side_distances(points[None], boxes[:, None])  # (G, N, 4)
        inside = dist.min(dim=-1).values > 0
        largest = dist.max(dim=-1).values
        point_ranges = ranges[level]
        in_range = (largest > point_ranges[None, :, 0]) & (largest <= point_ranges[None, :, 1])
        area = (boxes[:, 2] * boxes[:, 3])[:, None].expand(-1, n)
        cost = torch.where(inside & in_range, area, torch.full_like(area, math.inf))
        best_cost, best_gt = cost.min(dim=0)
        matched = torch.where(torch.isfinite(best_cost), best_gt, matched)
        # GTs without any point: the point nearest the centre on the level their size belongs to.
        orphans = (~torch.isfinite(cost).any(dim=1)).nonzero(as_tuple=True)[0]
        if orphans.numel():
            half = boxes[orphans, 2:4].max(dim=1).values / 2
            lvl = ((half[:, None] > ranges[:, 0][None]) & (half[:, None] <= ranges[:, 1][None])).float().argmax(dim=1)
            d2 = ((points[None] - boxes[orphans, None, :2]) ** 2).sum(-1)
            d2 = torch.where(level[None] == lvl[:, None], d2, torch.full_like(d2, math.inf))
            nearest = d2.argmin(dim=1)
            matched[nearest] = orphans
            fallback[nearest] = True
        return matched, fallback

    def loss(self, output: DetectorOutput, targets: Targets) -> tuple[Assignment, dict[str, Tensor]]:
        """Focal loss, smooth-L1 on side distances (+ angle), centerness BCE (+ CSL angle BCE); / #positives."""
        cls, box = output.flat_cls(), output.flat_box()
        ctr = flatten_levels(output.centerness, 1)[..., 0]
        anchors = output.flat_anchors()
        sizes = output.level_sizes()
        dev = anchors.device
        strides_t = torch.tensor(output.info.strides, dtype=anchors.dtype, device=dev)
        level = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
        stride = strides_t[level]
        ranges = torch.tensor(level_ranges(output.info.strides), dtype=anchors.dtype, device=dev)
        points = anchors[:, :2]

        matched, fallback, labels, target_boxes = [], [], [], []
        with torch.no_grad():
            for boxes, gt_labels in zip(targets.boxes, targets.labels):
                boxes, gt_labels = boxes.to(dev, anchors.dtype), gt_labels.to(dev)
                m, f = self.assign(points, level, ranges, boxes if self.box_dim == 5 else xyxy_as_obb(boxes))
                has = (m >= 0)[:, None]
                if boxes.shape[0] == 0:  # nothing to index: all negative
                    boxes, gt_labels = boxes.new_zeros(1, self.box_dim), gt_labels.new_full((1,), -1)
                matched.append(m)
                fallback.append(f)
                labels.append(torch.where(has[:, 0], gt_labels[m.clamp(min=0)], -1))
                target_boxes.append(torch.where(has, boxes[m.clamp(min=0)], 0.0))
        matched, fallback = torch.stack(matched), torch.stack(fallback)
        labels, target_boxes = torch.stack(labels), torch.stack(target_boxes)
        pos = matched >= 0
        asg = Assignment(pos, ~pos, torch.zeros_like(pos), matched, labels, target_boxes)

        num_pos = pos.sum().clamp(min=1).to(cls.dtype)
        onehot = F.one_hot(labels.clamp(min=0), self.num_classes).to(cls.dtype) * pos[..., None].to(cls.dtype)
        cls_loss = sigmoid_focal_loss(cls, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_pos

        b_idx, p_idx = pos.nonzero(as_tuple=True)
        gt = target_boxes[b_idx, p_idx]
        target = self.encode_boxes(points[p_idx], gt, stride[p_idx])
        dist = target[:, :4] * stride[p_idx, None]
        box_loss = F.smooth_l1_loss(box[b_idx, p_idx], target, beta=1.0 / 9, reduction="sum") / num_pos

        ctr_target = torch.where(fallback[b_idx, p_idx], 1.0, centerness_target(dist))
        ctr_loss = F.binary_cross_entropy_with_logits(ctr[b_idx, p_idx], ctr_target, reduction="sum") / num_pos
        losses = {"cls": cls_loss, "box": box_loss, "centerness": ctr_loss}
        if self.angle_bins:
            logits = flatten_levels(output.angle_logits, 1)[b_idx, p_idx]
            bce = F.binary_cross_entropy_with_logits(logits, csl_targets(gt[:, 4], self.angle_bins), reduction="none")
            losses["angle"] = bce.mean(dim=1).sum() / num_pos
        return asg, losses
