"""Exact IoU of oriented boxes, vectorised in torch (CPU or CUDA).

The intersection of two convex quadrilaterals is a convex polygon whose
vertices are among: the corners of A inside B, the corners of B inside A, and
the 16 crossings of an edge of A with an edge of B. All 24 candidates are
computed for every pair at once with validity masks; the valid ones are sorted
by angle around their mean (which lies inside the polygon) and the shoelace
formula gives the area. Invalid slots are filled with the first valid vertex,
so they add zero-length edges and nothing to the area.

Everything is computed in float64 whatever the input dtype (the cancellation
in the shoelace sum would cost float32 ~1e-3), and pairs whose enclosing
axis-aligned boxes do not overlap are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rkd.geometry.boxes import as_tensor, obb_to_hbb

# Slack, relative to the box size, for "on the boundary" decisions; boundary points
# must survive rounding, and admitting points this far outside changes areas by ~1e-9.
_REL_TOL = 1e-9

# Pairs per chunk: on CPU small chunks keep the ~30 float64 temporaries in cache (measured fastest);
# on GPU big chunks amortise kernel launches (about 100 MB of temporaries).
_CPU_CHUNK, _GPU_CHUNK = 2048, 1 << 15


def _chunk(chunk_pairs: int | None, device: torch.device) -> int:
    if chunk_pairs is not None:
        if chunk_pairs < 1:
            raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
        return chunk_pairs
    return _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK


def _check(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"{name} must have shape (N, 5) (cx, cy, w, h, angle), got {tuple(boxes.shape)}")


def _corners(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """x and y (P, 4) of the corners, counter-clockwise in the box's own (right-handed) frame."""
    cx, cy, w, h, a = boxes.unbind(-1)
    cos, sin = torch.cos(a)[:, None], torch.sin(a)[:, None]
    su = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=boxes.dtype, device=boxes.device)
    sv = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=boxes.dtype, device=boxes.device)
    du, dv = su * w[:, None], sv * h[:, None]
    return cx[:, None] + du * cos - dv * sin, cy[:, None] + du * sin + dv * cos


def _inside(x: Tensor, y: Tensor, boxes: Tensor) -> Tensor:
    """Mask (P, K): is each of the K points (x, y) of pair p inside (or on) box p of ``boxes`` (P, 5)."""
    cx, cy, w, h, a = boxes.unbind(-1)
    cos, sin = torch.cos(a)[:, None], torch.sin(a)[:, None]
    dx, dy = x - cx[:, None], y - cy[:, None]
    along_w = dx * cos + dy * sin
    along_h = dy * cos - dx * sin
    tol = (_REL_TOL * torch.maximum(w, h) + 1e-12)[:, None]
    return (along_w.abs() <= w[:, None] / 2 + tol) & (along_h.abs() <= h[:, None] / 2 + tol)


def _pseudo_angle(dx: Tensor, dy: Tensor) -> Tensor:
    """A cheap stand-in for atan2(dy, dx): same order, values in (-1, 3]."""
    norm = dx.abs() + dy.abs()
    ratio = dy / torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(dx >= 0, ratio, 2 - ratio)


def edge_crossings(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Crossings of every edge of polygon A (P, n) with every edge of polygon B (P, m): x, y, valid (P, n * m).

    Edge i of A is a[i] + t * ra[i], edge j of B is b[j] + u * rb[j]; a crossing is valid when both
    parameters are in [0, 1] (with slack) and the edges are not parallel.
    """
    rax, ray = (ax.roll(-1, dims=1) - ax)[:, :, None], (ay.roll(-1, dims=1) - ay)[:, :, None]
    rbx, rby = (bx.roll(-1, dims=1) - bx)[:, None, :], (by.roll(-1, dims=1) - by)[:, None, :]
    qx, qy = bx[:, None, :] - ax[:, :, None], by[:, None, :] - ay[:, :, None]
    denom = rax * rby - ray * rbx
    lengths = torch.sqrt((rax * rax + ray * ray) * (rbx * rbx + rby * rby))
    not_parallel = denom.abs() > 1e-12 * lengths
    safe = torch.where(not_parallel, denom, torch.ones_like(denom))
    t = (qx * rby - qy * rbx) / safe
    u = (qx * ray - qy * rax) / safe
    eps = 1e-9
    crossing_ok = not_parallel & (t >= -eps) & (t <= 1 + eps) & (u >= -eps) & (u <= 1 + eps)
    px = (ax[:, :, None] + t * rax).flatten(1)
    py = (ay[:, :, None] + t * ray).flatten(1)
    return px, py, crossing_ok.flatten(1)


def convex_hull_area(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Area (P,) of the convex polygon whose vertices are the ``valid`` ones of the candidates (P, K).

    The valid candidates are sorted by angle around their mean (which lies inside the
    polygon) and the shoelace formula gives the area; invalid slots are filled with the
    first valid vertex, so they add zero-length edges and nothing to the area.
    """
    count = valid.sum(1, keepdim=True).clamp_min(1)
    # centring on the mean also keeps the shoelace sum well conditioned
    x = x - (x * valid).sum(1, keepdim=True) / count
    y = y - (y * valid).sum(1, keepdim=True) / count
    angle = torch.where(valid, _pseudo_angle(x, y), torch.full_like(x, 10.0))  # invalid slots sort last
    order = angle.argsort(dim=1)
    x, y, valid = x.gather(1, order), y.gather(1, order), valid.gather(1, order)
    x = torch.where(valid, x, x[:, :1])  # pairs with no valid vertex: all equal, area 0
    y = torch.where(valid, y, y[:, :1])
    area = (x * y.roll(-1, dims=1) - x.roll(-1, dims=1) * y).sum(1) / 2
    return area.abs()


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Intersection area (P,) of the box pairs ``a[p]``, ``b[p]`` (float64, (P, 5) each)."""
    ax, ay = _corners(a)
    bx, by = _corners(b)
    px, py, crossing_ok = edge_crossings(ax, ay, bx, by)  # the 16 edge-edge crossings
    x = torch.cat([ax, bx, px], dim=1)  # (P, 24) candidate vertices
    y = torch.cat([ay, by, py], dim=1)
    valid = torch.cat([_inside(ax, ay, b), _inside(bx, by, a), crossing_ok], dim=1)
    return convex_hull_area(x, y, valid)


def _hbb_overlap(ha: Tensor, hb: Tensor) -> Tensor:
    overlap_x = (ha[..., 0] <= hb[..., 2]) & (hb[..., 0] <= ha[..., 2])
    return overlap_x & (ha[..., 1] <= hb[..., 3]) & (hb[..., 1] <= ha[..., 3])


def _ratio(inter: Tensor, area_a: Tensor, area_b: Tensor, mode: str) -> Tensor:
    inter = torch.minimum(inter, torch.minimum(area_a, area_b))  # also makes zero-area boxes exactly 0
    denom = area_a if mode == "iof" else area_a + area_b - inter
    ok = denom > 0
    return torch.where(ok, inter / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(inter)).clamp(0, 1)


def _float64(boxes: Tensor) -> Tensor:
    """A float64 copy with negative sizes clamped to 0 (never modifies the caller's tensor)."""
    boxes = boxes.to(torch.float64)
    return torch.cat([boxes[:, :2], boxes[:, 2:4].clamp_min(0), boxes[:, 4:]], dim=1)


def _check_mode(mode: str) -> None:
    if mode not in ("iou", "iof"):
        raise ValueError(f"mode must be 'iou' or 'iof' (intersection over the area of a), got {mode!r}")


def aligned_inputs(a: Tensor, b: Tensor, mode: str, check: Callable[[Tensor, str], None], what: str):
    """``(a, b, result dtype)`` of two checked inputs of an aligned (row i with row i) IoU."""
    _check_mode(mode)
    a, b = as_tensor(a), as_tensor(b)
    check(a, "a")
    check(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of {what}, got {a.shape[0]} and {b.shape[0]}")
    return a, b, torch.promote_types(a.dtype, b.dtype)


def rotated_iou_aligned(a: Tensor, b: Tensor, mode: str = "iou", chunk_pairs: int | None = None) -> Tensor:
    """IoU (N,) of ``a[i]`` with ``b[i]``; ``a``, ``b`` are (N, 5) oriented boxes.

    ``mode="iof"`` gives intersection over the area of ``a`` instead.

    >>> box = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    >>> rotated_iou_aligned(box, box + torch.tensor([1.0, 0, 0, 0, 0]))
    tensor([0.3333])
    """
    a, b, out_dtype = aligned_inputs(a, b, mode, _check, "boxes")
    a64, b64 = _float64(a), _float64(b)
    chunk_pairs = _chunk(chunk_pairs, a.device)
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    pairs = _hbb_overlap(obb_to_hbb(a64), obb_to_hbb(b64)).nonzero().squeeze(1)
    for start in range(0, pairs.numel(), chunk_pairs):
        idx = pairs[start : start + chunk_pairs]
        pa, pb = a64[idx], b64[idx]
        inter = _intersection_area(pa, pb)
        out[idx] = _ratio(inter, pa[:, 2] * pa[:, 3], pb[:, 2] * pb[:, 3], mode)
    return out.to(out_dtype)


def rotated_iou(a: Tensor, b: Tensor, mode: str = "iou", chunk_pairs: int | None = None) -> Tensor:
    """IoU matrix (N, M) between oriented boxes ``a`` (N, 5) and ``b`` (M, 5).

    Only pairs whose enclosing axis-aligned boxes overlap are computed; the
    rest are 0. Work is chunked so memory stays bounded for any N * M.
    ``mode="iof"`` gives intersection over the area of the ``a`` box.

    >>> a = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    >>> b = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.7853981633974483], [9.0, 9.0, 1.0, 1.0, 0.0]])
    >>> rotated_iou(a, b)  # square vs the same square turned 45 degrees: 8(sqrt2 - 1) / (8 - 8(sqrt2 - 1))
    tensor([[0.7071, 0.0000]])
    """
    _check_mode(mode)
    a, b = as_tensor(a), as_tensor(b)
    _check(a, "a")
    _check(b, "b")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    n, m = a.shape[0], b.shape[0]
    chunk_pairs = _chunk(chunk_pairs, a.device)
    out = torch.zeros(n, m, dtype=torch.float64, device=a.device)
    if n == 0 or m == 0:
        return out.to(out_dtype)
    a64, b64 = _float64(a), _float64(b)
    ha, hb = obb_to_hbb(a64), obb_to_hbb(b64)
    area_a, area_b = a64[:, 2] * a64[:, 3], b64[:, 2] * b64[:, 3]
    rows_per_block = max(1, (max(chunk_pairs, 1 << 15) * 16) // m)  # bounds the (rows, M) candidate mask
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(n, r0 + rows_per_block))
        ii, jj = _hbb_overlap(ha[rows, None, :], hb[None, :, :]).nonzero(as_tuple=True)
        ii = ii + r0
        for start in range(0, ii.numel(), chunk_pairs):
            i, j = ii[start : start + chunk_pairs], jj[start : start + chunk_pairs]
            inter = _intersection_area(a64[i], b64[j])
            out[i, j] = _ratio(inter, area_a[i], area_b[j], mode)
    return out.to(out_dtype)
