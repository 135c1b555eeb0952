"""Box coders: boxes <-> regression deltas relative to anchors.

Oriented (``box_dim == 5``): for anchor ``(px, py, pw, ph, pa)`` and box
``(gx, gy, gw, gh, ga)``, the centre offset is expressed in the anchor's own
frame, the sizes as log ratios and the angle as the wrapped difference::

    dx = ((gx - px) cos pa + (gy - py) sin pa) / pw
    dy = (-(gx - px) sin pa + (gy - py) cos pa) / ph
    dw = log(gw' / pw),  dh = log(gh' / ph),  da = ga' - pa

A box ``(w, h, a)`` equals ``(h, w, a +- pi/2)``; the encoder picks the one of
the two whose angle is within ``pi/4`` of the anchor's (``gw', gh', ga'``), so
``da`` lies in ``[-pi/4, pi/4)`` and a near-vertical box next to a horizontal
anchor does not need a large angle delta. Decoding returns le90 boxes.

Horizontal (``box_dim == 4``): boxes and anchors are ``(x1, y1, x2, y2)`` and the
deltas are the usual ``(dx, dy, dw, dh)`` of centre and log size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rkd.geometry import normalize_le90

# exp() of a size delta is clamped here so a wild prediction cannot overflow.
MAX_LOG_SIZE_RATIO = math.log(1000.0 / 16)


def wrap_angle(a: Tensor, period: float = math.pi) -> Tensor:
    """Wrap angles into ``[-period/2, period/2)``.

    >>> wrap_angle(torch.tensor([math.pi / 2, -math.pi / 2, 3.0])).tolist()  # doctest: +ELLIPSIS
    [-1.5707..., -1.5707..., -0.1415...]
    """
    return torch.remainder(a + period / 2, period) - period / 2


class ObbCoder:
    """Encode/decode le90 oriented boxes against (possibly rotated) anchors."""

    box_dim = 5

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """``(N, 5)`` boxes and ``(N, 5)`` anchors -> ``(N, 5)`` deltas."""
        gx, gy, gw, gh, ga = boxes.unbind(-1)
        px, py, pw, ph, pa = anchors.unbind(-1)
        d = wrap_angle(ga - pa)
        quarter = math.pi / 4
        swap = (d >= quarter) | (d < -quarter)
        d = torch.where(d >= quarter, d - math.pi / 2, torch.where(d < -quarter, d + math.pi / 2, d))
        gw, gh = torch.where(swap, gh, gw), torch.where(swap, gw, gh)
        cos, sin = torch.cos(pa), torch.sin(pa)
        ox, oy = gx - px, gy - py
        dx = (ox * cos + oy * sin) / pw
        dy = (-ox * sin + oy * cos) / ph
        return torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph), d], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``(..., 5)`` deltas and anchors (broadcastable) -> ``(..., 5)`` le90 boxes."""
        dx, dy, dw, dh, da = deltas.unbind(-1)
        px, py, pw, ph, pa = anchors.unbind(-1)
        cos, sin = torch.cos(pa), torch.sin(pa)
        gx = px + dx * pw * cos - dy * ph * sin
        gy = py + dx * pw * sin + dy * ph * cos
        gw = pw * torch.exp(dw.clamp(max=MAX_LOG_SIZE_RATIO))
        gh = ph * torch.exp(dh.clamp(max=MAX_LOG_SIZE_RATIO))
        boxes = torch.stack([gx, gy, gw, gh, pa + da], dim=-1)
        return normalize_le90(boxes.reshape(-1, 5)).reshape(boxes.shape)


class HbbCoder:
    """Encode/decode horizontal ``(x1, y1, x2, y2)`` boxes against horizontal anchors."""

    box_dim = 4

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        gw, gh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        dx = (boxes[..., 0] + boxes[..., 2] - anchors[..., 0] - anchors[..., 2]) / (2 * pw)
        dy = (boxes[..., 1] + boxes[..., 3] - anchors[..., 1] - anchors[..., 3]) / (2 * ph)
        return torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        px, py = anchors[..., 0] + pw / 2, anchors[..., 1] + ph / 2
        cx, cy = px + deltas[..., 0] * pw, py + deltas[..., 1] * ph
        w = pw * torch.exp(deltas[..., 2].clamp(max=MAX_LOG_SIZE_RATIO))
        h = ph * torch.exp(deltas[..., 3].clamp(max=MAX_LOG_SIZE_RATIO))
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def make_coder(box_dim: int) -> ObbCoder | HbbCoder:
    if box_dim == 5:
        return ObbCoder()
    if box_dim == 4:
        return HbbCoder()
    raise ValueError(f"box_dim must be 4 or 5, got {box_dim}")
