"""Cutting large scenes into overlapping square patches, with their objects.

Windows follow DOTA's devkit: ``size`` pixels wide, a stride of ``size - overlap``
from the top-left, and the last window of each row/column moved back so it is
flush with the border (an image smaller than ``size`` is one window of its own
size; nothing is padded).

An object goes to a patch when at least ``min_area_fraction`` of its area lies
inside it. An object that is cut (less than all of it inside) is replaced by the
minimum-area rectangle of its part inside the patch and flagged ``difficult``;
an uncut object keeps its box and flag. Clipping is Sutherland-Hodgman against
the window's 4 edges, vectorised over all boxes of an image.

Patch ids are ``<image_id>__1__<x0>___<y0>`` (the devkit's naming, scale 1), so
:func:`rkd.eval.merge.parse_patch_id` can put detections back into the scene.

Geometry and lazy patch records only; ``rkd data tile``, which writes a tiled copy of a dataset,
is :mod:`rkd.data.tiled_copy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rkd.data import cache
from rkd.data.sample import DetectionRecord, Sample
from rkd.data.windows import window_starts
from rkd.errors import DataError
from rkd.geometry.boxes import normalize_le90, obb_to_poly

DEFAULT_SIZE = 1024
DEFAULT_OVERLAP = 200
DEFAULT_MIN_AREA_FRACTION = 0.7

# An object with this much of its area inside still counts as whole (float error of the clip).
_WHOLE = 1 - 1e-6


class Window(NamedTuple):
    """A patch in scene pixels: columns ``[x0, x1)``, rows ``[y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def check_tiling(size: int, overlap: int, min_area_fraction: float = 0.5) -> None:
    if size < 1:
        raise DataError(f"tile size must be >= 1 pixel, got {size}")
    if not 0 <= overlap < size:
        raise DataError(f"tile overlap {overlap} must be >= 0 and smaller than the tile size {size}")
    if not 0 < min_area_fraction <= 1:
        raise DataError(f"min area fraction must be in (0, 1], got {min_area_fraction}")


def tile_windows(h: int, w: int, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP) -> list[Window]:
    """Windows covering an ``h x w`` image, row by row.

    >>> tile_windows(700, 1000, 400, 100)[:4]
    [Window(x0=0, y0=0, x1=400, y1=400), Window(x0=300, y0=0, x1=700, y1=400), \
Window(x0=600, y0=0, x1=1000, y1=400), Window(x0=0, y0=300, x1=400, y1=700)]
    """
    check_tiling(size, overlap)
    return [
        Window(x0, y0, min(x0 + size, w), min(y0 + size, h))
        for y0 in window_starts(h, size, overlap)
        for x0 in window_starts(w, size, overlap)
    ]


def patch_id(image_id: str, window: Window) -> str:
    """The devkit's name of a patch: ``<image_id>__1__<x0>___<y0>``.

    >>> patch_id("P0001", Window(824, 0, 1848, 1024))
    'P0001__1__824___0'
    """
    return f"{image_id}__1__{window.x0}___{window.y0}"


# --- vectorised clipping of convex polygons against a rectangle ----------------------------------------


def _clip_half_plane(poly: Tensor, inside_of: Callable[[Tensor], Tensor]) -> Tensor:
    """Clip convex polygons (N, K, 2) to ``inside_of(points) >= 0`` (a linear function of the points).

    Polygons are padded to K vertices by repeating a vertex (zero-length edges
    change neither the shape nor the area). The result has K + 1 vertices;
    a polygon entirely outside collapses to K + 1 copies of one point (area 0).
    """
    n, k, _ = poly.shape
    nxt = poly.roll(-1, dims=1)
    s, s_next = inside_of(poly), inside_of(nxt)
    inside, inside_next = s >= 0, s_next >= 0
    # Where the edge crosses the line s = 0 (only used where the signs differ, so the division is safe).
    t = (s / torch.where(inside != inside_next, s - s_next, torch.ones_like(s))).unsqueeze(-1)
    crossing = poly + t * (nxt - poly)
    # Each edge emits its start (if inside) then its crossing (if it crosses): 2K candidates in order.
    candidates = torch.stack([poly, crossing], dim=2).reshape(n, 2 * k, 2)
    valid = torch.stack([inside, inside != inside_next], dim=2).reshape(n, 2 * k)
    # Move the valid candidates to the front in order (stable sort), keep K + 1 slots (a convex
    # polygon gains at most one vertex per clip), and pad with the first valid vertex.
    order = (~valid).to(torch.int8).argsort(dim=1, stable=True)[:, : k + 1]
    packed = candidates.gather(1, order[..., None].expand(-1, -1, 2))
    packed_valid = valid.gather(1, order)
    first = packed[:, :1].expand_as(packed)
    return torch.where(packed_valid[..., None], packed, first)


def clip_polygons(polys: Tensor, window: Window) -> Tensor:
    """The parts (N, 8, 2) of convex quadrilaterals (N, 8) inside ``window``, padded with repeated vertices."""
    p = polys.to(torch.float64).reshape(-1, 4, 2)
    p = _clip_half_plane(p, lambda q: q[..., 0] - window.x0)
    p = _clip_half_plane(p, lambda q: window.x1 - q[..., 0])
    p = _clip_half_plane(p, lambda q: q[..., 1] - window.y0)
    return _clip_half_plane(p, lambda q: window.y1 - q[..., 1])


def polygon_area(poly: Tensor) -> Tensor:
    """Shoelace area (N,) of polygons (N, K, 2) of any vertex count."""
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * (x * y.roll(-1, dims=-1) - x.roll(-1, dims=-1) * y).sum(-1).abs()


def min_area_rect(poly: Tensor) -> Tensor:
    """le90 minimum-area rectangles (N, 5) enclosing convex polygons (N, K, 2) (padded ones welcome).

    The optimal rectangle has a side along a hull edge, so each edge direction is tried.

    >>> min_area_rect(torch.tensor([[[0.0, 0], [4, 0], [4, 2], [2, 3], [0, 2]]], dtype=torch.float64))
    tensor([[2.0000, 1.5000, 4.0000, 3.0000, 0.0000]], dtype=torch.float64)
    """
    d = poly.roll(-1, dims=1) - poly  # (N, K, 2) edge vectors
    length = d.norm(dim=-1, keepdim=True)
    unit_x = torch.tensor([1.0, 0.0], dtype=poly.dtype, device=poly.device)
    u = torch.where(length > 0, d / length.clamp_min(1e-300), unit_x)  # a repeated vertex: any direction encloses
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    pu = torch.einsum("nkc,nec->nek", poly, u)  # (N, edges, points) projections
    pv = torch.einsum("nkc,nec->nek", poly, v)
    umin, umax, vmin, vmax = pu.amin(-1), pu.amax(-1), pv.amin(-1), pv.amax(-1)
    best = ((umax - umin) * (vmax - vmin)).argmin(-1, keepdim=True)

    def pick(x: Tensor) -> Tensor:
        return x.gather(-1, best).squeeze(-1)

    umid, vmid = pick((umin + umax) / 2), pick((vmin + vmax) / 2)
    ub = u.gather(1, best[..., None].expand(-1, -1, 2)).squeeze(1)
    cx = umid * ub[:, 0] - vmid * ub[:, 1]
    cy = umid * ub[:, 1] + vmid * ub[:, 0]
    angle = torch.atan2(ub[:, 1], ub[:, 0])
    return normalize_le90(torch.stack([cx, cy, pick(umax - umin), pick(vmax - vmin), angle], dim=-1))


@dataclass
class WindowTargets:
    """The objects of one window: ``keep`` indexes the scene's objects; boxes are in window pixels."""

    keep: Tensor  # (K,) long
    boxes: Tensor  # (K, 5) float32 le90
    truncated: Tensor  # (K,) bool
    inside_fraction: Tensor  # (K,) float64


def crop_targets(boxes: Tensor, window: Window, min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION) -> WindowTargets:
    """Which le90 ``boxes`` (N, 5) a window keeps, and their boxes in window coordinates (see module doc).

    >>> t = crop_targets(torch.tensor([[10.0, 10, 8, 4, 0], [98, 10, 8, 4, 0], [103, 10, 8, 4, 0]]),
    ...                  Window(0, 0, 100, 100))
    >>> t.keep.tolist(), t.truncated.tolist(), t.boxes[1].tolist()
    ([0, 1], [False, True], [97.0, 10.0, 6.0, 4.0, 0.0])
    """
    boxes64 = boxes.to(torch.float64).reshape(-1, 5)
    clipped = clip_polygons(obb_to_poly(boxes64), window)
    area = (boxes64[:, 2] * boxes64[:, 3]).clamp_min(1e-12)
    fraction = (polygon_area(clipped) / area).clamp(max=1.0)
    keep = torch.nonzero(fraction >= min_area_fraction).flatten()
    truncated = fraction[keep] < _WHOLE
    out = boxes64[keep].clone()
    if truncated.any():
        out[truncated] = min_area_rect(clipped[keep[truncated]])
    out[:, 0] -= window.x0
    out[:, 1] -= window.y0
    return WindowTargets(keep, out.to(torch.float32), truncated, fraction[keep])


def tile_sample(
    sample: Sample,
    size: int = DEFAULT_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
) -> list[tuple[Window, Sample]]:
    """The patches of a sample, each a :class:`Sample` with ``image_id`` :func:`patch_id` (see module doc)."""
    check_tiling(size, overlap, min_area_fraction)
    _, h, w = sample.image.shape
    out = []
    for window in tile_windows(h, w, size, overlap):
        targets = crop_targets(sample.boxes, window, min_area_fraction)
        patch = replace(
            sample,
            image=sample.image[:, window.y0 : window.y1, window.x0 : window.x1].contiguous(),
            boxes=targets.boxes,
            labels=sample.labels[targets.keep],
            difficult=sample.difficult[targets.keep] | targets.truncated,
            image_id=patch_id(sample.image_id, window),
            orig_size=(window.height, window.width),
            scale=1.0,
        )
        out.append((window, patch))
    return out


@dataclass
class PatchCrop:
    """A picklable ``render`` for a patch record: reads the scene (file or render) and crops the window.

    With ``cached``, a file's patch comes from the patch cache (:mod:`rkd.data.cache`); a miss
    decodes the scene once and keeps every window of ``siblings`` (the scene's patches in the
    dataset), so the scene is not decoded again for its other patches, in any process.
    """

    source: DetectionRecord
    window: Window
    siblings: tuple[Window, ...] = ()
    cached: bool = False

    def __call__(self) -> Tensor:
        path = self.source.image_path
        if self.source.render is not None or path is None:
            w = self.window
            return self.source.load_image()[:, w.y0 : w.y1, w.x0 : w.x1].contiguous()
        array = cache.load_patch(path, self.window) if self.cached else None
        return torch.from_numpy(self.decode() if array is None else array)

    def decode(self) -> np.ndarray:
        """The window's ``(3, H, W)`` pixels, read from the scene file (with ``cached``, every window of
        ``siblings`` is kept too)."""
        from PIL import Image

        from rkd.data.images import to_rgb8

        path = self.source.image_path
        try:
            with Image.open(path) as im:
                if (im.height, im.width) != tuple(self.source.image_size):
                    raise DataError(
                        f"{path}: image is {(im.height, im.width)} (H, W) "
                        f"but its labels were indexed for {tuple(self.source.image_size)}"
                    )
                if not self.cached:
                    # Crop before converting: only the patch is copied out of PIL's buffer.
                    return _channels_first(to_rgb8(im.crop(tuple(self.window))))
                im.load()  # decoded once; each window is then cut and converted exactly as above
                mine = None
                for window in dict.fromkeys((self.window, *self.siblings)):
                    array = _channels_first(to_rgb8(im.crop(tuple(window))))
                    cache.store_patch(path, window, array)
                    mine = array if window == self.window else mine
                return mine
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot read image: {e}") from e


def _channels_first(rgb: np.ndarray) -> np.ndarray:
    """A writable ``(3, H, W)`` copy of an ``(H, W, 3)`` array."""
    return rgb.transpose(2, 0, 1).copy()  # C order


def tile_records(
    records: list[DetectionRecord],
    size: int = DEFAULT_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    patch_cache: bool = False,
) -> list[DetectionRecord]:
    """One lazy record per patch of every record: labels are cut now, pixels are read when loaded
    (from the patch cache with ``patch_cache``, see :class:`PatchCrop`)."""
    check_tiling(size, overlap, min_area_fraction)
    out = []
    for record in records:
        h, w = record.image_size
        windows = tuple(tile_windows(h, w, size, overlap))
        for window in windows:
            targets = crop_targets(record.boxes, window, min_area_fraction)
            out.append(
                DetectionRecord(
                    image_id=patch_id(record.image_id, window),
                    image_size=(window.height, window.width),
                    boxes=targets.boxes,
                    labels=record.labels[targets.keep],
                    difficult=record.difficult[targets.keep] | targets.truncated,
                    render=PatchCrop(record, window, windows, patch_cache),
                )
            )
    return out
