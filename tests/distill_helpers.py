"""Builders of the KD loss tests: random detector outputs, infos and targets, seeded weights, and the
float64 numpy helpers the references share (box corners, cell overlaps, 3x3 convolution, flattening)."""

from __future__ import annotations

import math

import numpy as np
import torch
from shapely.geometry import Polygon
from shapely.geometry import box as shapely_box

from rkd.outputs import Assignment, DetectorInfo, DetectorOutput, Targets


def make_info(
    channels=(6, 10), strides=(8, 16), num_classes=3, num_anchors=2, box_dim=5, angle_bins=0, centerness=False
) -> DetectorInfo:
    return DetectorInfo(
        level_channels=tuple(channels),
        strides=tuple(strides),
        num_classes=num_classes,
        num_anchors=num_anchors,
        box_dim=box_dim,
        has_centerness=centerness,
        angle_bins=angle_bins,
    )


def make_output(
    info: DetectorInfo,
    image_size=(32, 48),
    batch=2,
    gen: torch.Generator | None = None,
    requires_grad=False,
    neg_fraction=0.7,
) -> DetectorOutput:
    """A DetectorOutput of random tensors with grid anchors and a random assignment."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    h_img, w_img = image_size
    a, k, d = info.num_anchors, info.num_classes, info.box_dim

    def rnd(*shape):
        t = torch.randn(*shape, generator=gen)
        return t.requires_grad_(requires_grad)

    feats, cls, box, anchors, ang, ctr = [], [], [], [], [], []
    for c, s in zip(info.level_channels, info.strides):
        h, w = h_img // s, w_img // s
        feats.append(rnd(batch, c, h, w))
        cls.append(rnd(batch, a * k, h, w))
        box.append(rnd(batch, a * d, h, w))
        if info.angle_bins:
            ang.append(rnd(batch, a * info.angle_bins, h, w))
        if info.has_centerness:
            ctr.append(rnd(batch, a, h, w))
        ys, xs = torch.meshgrid(torch.arange(h) * s + s / 2, torch.arange(w) * s + s / 2, indexing="ij")
        pts = torch.stack([xs.flatten(), ys.flatten()], -1).float().repeat_interleave(a, dim=0)
        sizes = (4.0 * s) * torch.ones(pts.shape[0], 1)
        if d == 5:
            anchors.append(
                torch.cat(
                    [pts, sizes, sizes / (1 + (torch.arange(pts.shape[0])[:, None] % a)), torch.zeros(pts.shape[0], 1)],
                    -1,
                )
            )
        else:
            anchors.append(torch.cat([pts - sizes / 2, pts + sizes / 2], -1))
    n = sum(f.shape[-2] * f.shape[-1] * a for f in feats)
    u = torch.rand(batch, n, generator=gen)
    neg = u < neg_fraction
    pos = u > 0.9
    ignore = ~(neg | pos)
    labels = torch.where(pos, torch.randint(0, k, (batch, n), generator=gen), torch.full((batch, n), -1))
    assignment = Assignment(
        pos_mask=pos,
        neg_mask=neg,
        ignore_mask=ignore,
        matched_gt=torch.where(pos, torch.zeros(batch, n, dtype=torch.long), torch.full((batch, n), -1)),
        matched_labels=labels,
        target_boxes=torch.zeros(batch, n, d),
    )
    return DetectorOutput(
        info=info,
        features=feats,
        cls_logits=cls,
        box_regs=box,
        anchors=anchors,
        image_size=tuple(image_size),
        centerness=ctr or None,
        angle_logits=ang or None,
        assignment=assignment,
    )


def make_targets(image_size=(32, 48), batch=2, gen: torch.Generator | None = None, num_classes=3) -> Targets:
    """Random le90 boxes; the last image has none."""
    gen = gen if gen is not None else torch.Generator().manual_seed(1)
    h_img, w_img = image_size
    boxes, labels = [], []
    for i in range(batch):
        m = 0 if i == batch - 1 and batch > 1 else 3
        cx = torch.rand(m, generator=gen) * w_img
        cy = torch.rand(m, generator=gen) * h_img
        w = 6 + torch.rand(m, generator=gen) * 20
        h = w * (0.3 + 0.7 * torch.rand(m, generator=gen))
        ang = (torch.rand(m, generator=gen) - 0.5) * math.pi
        boxes.append(torch.stack([cx, cy, w, h, ang], -1))
        labels.append(torch.randint(0, num_classes, (m,), generator=gen))
    return Targets(boxes, labels, tuple(image_size))


def set_conv_weights(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``module`` with seeded values (for goldens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def corners(box) -> list[tuple[float, float]]:
    cx, cy, w, h, a = (float(v) for v in box)
    ux, uy = math.cos(a), math.sin(a)  # w-axis
    vx, vy = -math.sin(a), math.cos(a)  # h-axis
    return [
        (cx + sx * w / 2 * ux + sy * h / 2 * vx, cy + sx * w / 2 * uy + sy * h / 2 * vy)
        for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))
    ]


def touches_cell(poly: Polygon, x: int, y: int, s: float) -> bool:
    """The cell ``[x s, (x+1) s] x [y s, (y+1) s]`` overlaps the polygon with positive area."""
    return poly.intersection(shapely_box(x * s, y * s, (x + 1) * s, (y + 1) * s)).area > 0


def conv3x3_np(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded 3x3 convolution as nine shifted einsums."""
    b, c, h, w = x.shape
    xp = np.zeros((b, c, h + 2, w + 2))
    xp[:, :, 1:-1, 1:-1] = x
    out = np.zeros((b, weight.shape[0], h, w)) + bias[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,bchw->bohw", weight[:, :, dy, dx], xp[:, :, dy : dy + h, dx : dx + w])
    return out


def sigmoid(x):
    """Float64 logistic function of a numpy array."""
    return 1 / (1 + np.exp(-x))


def flat_np(maps, a: int) -> np.ndarray:
    """(B, N, D) with N ordered level, y, x, anchor; channels a * D + d."""
    rows = []
    for m in maps:
        x = np64(m)
        b, ad, h, w = x.shape
        rows.append(x.reshape(b, a, ad // a, h, w).transpose(0, 3, 4, 1, 2).reshape(b, h * w * a, ad // a))
    return np.concatenate(rows, 1)
