"""Box representations and conversions.

Oriented boxes (OBBs) are ``(cx, cy, w, h, angle)`` in pixels. The angle is
measured from +x towards +y (image y points down), so the w-axis direction is
``(cos a, sin a)`` and the h-axis direction is ``(-sin a, cos a)``.

The same rectangle has many such tuples (swap w/h and turn by pi/2, or turn by
pi); an *angle convention* picks one of them:

* ``le90``  - long side ``w >= h``, angle in ``[-pi/2, pi/2)`` (rkd's default).
* ``le135`` - long side ``w >= h``, angle in ``[-pi/4, 3pi/4)``.
* ``oc``    - OpenCV-style: angle in ``(0, pi/2]``, ``w`` is the side along that
  angle whichever is longer.

Polygons are ``(N, 8)``: ``x1 y1 x2 y2 x3 y3 x4 y4``. Horizontal boxes are
``(N, 4)`` xyxy. Every function takes torch tensors or numpy arrays and
returns torch tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision
from torch import Tensor

CONVENTIONS = ("le90", "le135", "oc")

# For each convention: start of its half-open angle range, and whether w must be the long side.
_RANGE_START = {"le90": -math.pi / 2, "le135": -math.pi / 4}


def as_tensor(x: Tensor | np.ndarray, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` as a floating torch tensor (numpy arrays and lists are converted, tensors kept on their device)."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if dtype is not None:
        return t.to(dtype)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_last_dim(t: Tensor, size: int, what: str) -> None:
    if t.shape[-1] != size:
        raise ValueError(f"{what} must have shape (..., {size}), got {tuple(t.shape)}")


def _wrap(angle: Tensor, start: float, period: float) -> Tensor:
    """``angle`` wrapped into ``[start, start + period)``; guards the rounding case that lands on the end."""
    wrapped = torch.remainder(angle - start, period) + start
    return torch.where(wrapped >= start + period, wrapped - period, wrapped)


def normalize_obb(obbs: Tensor | np.ndarray, convention: str = "le90") -> Tensor:
    """The tuple that ``convention`` uses for each rectangle in ``obbs`` (N, 5).

    >>> normalize_obb(torch.tensor([[0.0, 0.0, 2.0, 4.0, 0.0]]), "le90")
    tensor([[ 0.0000,  0.0000,  4.0000,  2.0000, -1.5708]])
    """
    t = as_tensor(obbs)
    _check_last_dim(t, 5, "obbs")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown angle convention {convention!r}; expected one of {CONVENTIONS}")
    cx, cy, w, h, a = t.unbind(-1)
    if convention == "oc":
        # Pick the representation (w, h, a) or (h, w, a + pi/2) whose angle mod pi falls in (0, pi/2].
        a = _wrap(a, 0.0, math.pi)  # [0, pi)
        swap = (a == 0) | (a > math.pi / 2)
        a = torch.where(swap, _wrap(a + math.pi / 2, 0.0, math.pi), a)
        # Rounding can turn a + pi/2 into exactly pi (-> 0): (h, w, 0) is the same box as (w, h, pi/2).
        at_zero = a == 0
        swap = swap & ~at_zero
        a = torch.where(at_zero, torch.full_like(a, math.pi / 2), a)
    else:
        swap = h > w
        a = _wrap(torch.where(swap, a + math.pi / 2, a), _RANGE_START[convention], math.pi)
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    return torch.stack([cx, cy, w, h, a], dim=-1)


def normalize_le90(obbs: Tensor | np.ndarray) -> Tensor:
    """le90 form: swap w/h (adding pi/2) where h > w, then wrap the angle into ``[-pi/2, pi/2)``.

    >>> normalize_le90(torch.tensor([[5.0, 5.0, 4.0, 2.0, math.pi / 2]]))
    tensor([[ 5.0000,  5.0000,  4.0000,  2.0000, -1.5708]])
    """
    return normalize_obb(obbs, "le90")


def obb_convert(obbs: Tensor | np.ndarray, src: str, dst: str) -> Tensor:
    """Re-express boxes given in convention ``src`` in convention ``dst`` (same rectangles)."""
    for name in (src, dst):
        if name not in CONVENTIONS:
            raise ValueError(f"unknown angle convention {name!r}; expected one of {CONVENTIONS}")
    # Every convention's tuple describes its rectangle completely, so src only needs validating.
    return normalize_obb(obbs, dst)


def obb_to_poly(obbs: Tensor | np.ndarray) -> Tensor:
    """Corners (N, 8) of each box, in order (+w/2,+h/2), (-w/2,+h/2), (-w/2,-h/2), (+w/2,-h/2) of its own axes.

    >>> obb_to_poly(torch.tensor([[10.0, 20.0, 4.0, 2.0, 0.0]]))
    tensor([[12., 21.,  8., 21.,  8., 19., 12., 19.]])
    """
    t = as_tensor(obbs)
    _check_last_dim(t, 5, "obbs")
    cx, cy, w, h, a = t.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    su = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=t.dtype, device=t.device)  # sign along w-axis
    sv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=t.dtype, device=t.device)  # sign along h-axis
    du = su * (w / 2)[..., None]
    dv = sv * (h / 2)[..., None]
    xs = cx[..., None] + du * cos[..., None] - dv * sin[..., None]
    ys = cy[..., None] + du * sin[..., None] + dv * cos[..., None]
    return torch.stack([xs, ys], dim=-1).flatten(-2)


# The 6 vertex pairs of a quadrilateral: every convex-hull edge is one of them.
_PAIRS_I = [0, 0, 0, 1, 1, 2]
_PAIRS_J = [1, 2, 3, 2, 3, 3]


def poly_to_obb(polys: Tensor | np.ndarray, convention: str = "le90") -> Tensor:
    """Minimum-area enclosing rectangle (N, 5) of each quadrilateral (N, 8), any vertex order or winding.

    The optimal rectangle has a side along a convex-hull edge; every hull edge
    joins two of the 4 vertices, so trying the directions of all 6 vertex pairs
    and keeping the smallest enclosing rectangle is exact.

    >>> poly_to_obb(torch.tensor([[0.0, 0.0, 4.0, 0.0, 4.0, 2.0, 0.0, 2.0]]))
    tensor([[2., 1., 4., 2., 0.]])
    """
    t = as_tensor(polys)
    _check_last_dim(t, 8, "polys")
    pts = t.reshape(*t.shape[:-1], 4, 2).to(torch.float64)
    d = pts[..., _PAIRS_J, :] - pts[..., _PAIRS_I, :]  # (..., 6, 2) candidate directions
    length = d.norm(dim=-1, keepdim=True)
    unit_x = torch.tensor([1.0, 0.0], dtype=pts.dtype, device=pts.device)
    # A repeated vertex gives no direction; any direction still encloses, so fall back to +x.
    u = torch.where(length > 0, d / length.clamp_min(1e-300), unit_x)
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    pu = torch.einsum("...kc,...pc->...pk", pts, u)  # (..., 6, 4) projections on each direction
    pv = torch.einsum("...kc,...pc->...pk", pts, v)
    umin, umax = pu.amin(-1), pu.amax(-1)
    vmin, vmax = pv.amin(-1), pv.amax(-1)
    best = ((umax - umin) * (vmax - vmin)).argmin(-1, keepdim=True)  # (..., 1)

    def pick(x: Tensor) -> Tensor:
        return x.gather(-1, best).squeeze(-1)

    umid, vmid = pick((umin + umax) / 2), pick((vmin + vmax) / 2)
    ub = u.gather(-2, best[..., None].expand(*best.shape, 2)).squeeze(-2)
    cx = umid * ub[..., 0] - vmid * ub[..., 1]
    cy = umid * ub[..., 1] + vmid * ub[..., 0]
    w, h = pick(umax - umin), pick(vmax - vmin)
    angle = torch.atan2(ub[..., 1], ub[..., 0])
    obbs = normalize_obb(torch.stack([cx, cy, w, h, angle], dim=-1), convention)
    return obbs.to(t.dtype)


def obb_to_hbb(obbs: Tensor | np.ndarray) -> Tensor:
    """Smallest axis-aligned xyxy box (N, 4) enclosing each oriented box.

    >>> obb_to_hbb(torch.tensor([[0.0, 0.0, 4.0, 2.0, math.pi / 2]]))
    tensor([[-1.0000, -2.0000,  1.0000,  2.0000]])
    """
    t = as_tensor(obbs)
    _check_last_dim(t, 5, "obbs")
    cx, cy, w, h, a = t.unbind(-1)
    cos, sin = torch.cos(a).abs(), torch.sin(a).abs()
    ex = (w * cos + h * sin) / 2
    ey = (w * sin + h * cos) / 2
    return torch.stack([cx - ex, cy - ey, cx + ex, cy + ey], dim=-1)


def hbb_to_obb(xyxy: Tensor | np.ndarray) -> Tensor:
    """le90 oriented boxes (N, 5) of axis-aligned xyxy boxes (a tall box gets angle -pi/2).

    >>> hbb_to_obb(torch.tensor([[0.0, 0.0, 4.0, 2.0]]))
    tensor([[2., 1., 4., 2., 0.]])
    """
    t = as_tensor(xyxy)
    _check_last_dim(t, 4, "xyxy")
    x1, y1, x2, y2 = t.unbind(-1)
    obbs = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)], dim=-1)
    return normalize_le90(obbs)


def box_area(boxes: Tensor | np.ndarray) -> Tensor:
    """Area of xyxy (N, 4), oriented (N, 5) or polygon (N, 8, shoelace) boxes.

    >>> box_area(torch.tensor([[0.0, 0.0, 3.0, 2.0]])), box_area(torch.tensor([[0.0, 0.0, 3.0, 2.0, 0.3]]))
    (tensor([6.]), tensor([6.]))
    """
    t = as_tensor(boxes)
    size = t.shape[-1]
    if size == 4:
        return (t[..., 2] - t[..., 0]).clamp_min(0) * (t[..., 3] - t[..., 1]).clamp_min(0)
    if size == 5:
        return t[..., 2] * t[..., 3]
    if size == 8:
        x, y = t[..., 0::2], t[..., 1::2]
        cross = x * y.roll(-1, dims=-1) - x.roll(-1, dims=-1) * y
        return cross.sum(-1).abs() / 2
    raise ValueError(f"boxes must have shape (..., 4), (..., 5) or (..., 8), got {tuple(t.shape)}")


def hbb_iou(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """IoU matrix (N, M) of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4).

    >>> hbb_iou(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
    tensor([[0.3333]])
    """
    ta, tb = as_tensor(a), as_tensor(b)
    _check_last_dim(ta, 4, "a")
    _check_last_dim(tb, 4, "b")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    return torchvision.ops.box_iou(ta.to(dtype), tb.to(dtype))
