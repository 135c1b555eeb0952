"""Images in and detections out of an rkd-exported ``model.onnx``, with numpy alone.

``rkd export`` copies this file beside the model; it needs nothing but numpy.

Input: :func:`letterbox` (detectors) and :func:`resize` (scene classifiers) give the pixels
training gave the network: torch's bilinear resampling (antialiased when shrinking; always for
classifiers), computed in float32 in torch's order, so at most one pixel value in ~10^4 differs,
by 1 (measured on UCAS-AOD and AID images); :func:`normalize` then makes the network input.

* Oriented-box models output candidates ``boxes (B, M, 5)`` (le90: cx, cy, w, h, angle in input
  pixels, ``w >= h``, angle in ``[-pi/2, pi/2)`` from +x towards +y), ``scores (B, M)`` and
  ``labels (B, M)``. :func:`detections` keeps the scores above the threshold and runs class-wise
  greedy rotated NMS (exact IoU of the rectangles by polygon clipping).
* Horizontal-box models did NMS in the graph and output ``boxes (D, 4)`` xyxy, ``scores``,
  ``labels`` and ``batch_index (D,)``; :func:`detections` splits them per image.

Either way each image gets ``{"boxes", "scores", "labels"}``, by descending score, at most
``max_per_image``: the result of ``rkd.models.postprocess.decode`` on the same image.

Usage::

    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
    per_image = detections(outputs, num_images=len(x), score_threshold=0.3, iou_threshold=0.1)
"""

from __future__ import annotations

import numpy as np

MEAN = (0.485, 0.456, 0.406)  # the network input is (RGB / 255 - MEAN) / STD, channels first
STD = (0.229, 0.224, 0.225)
PAD_RGB = (124, 116, 104)  # the letterbox's padding (rkd.data.transforms.PAD_RGB)
_F32 = np.float32


def _antialiased_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First input index ``(out,)`` and weights ``(out, K)`` of each output pixel: a triangle filter
    widened by the shrink factor and normalised, as torch's ``antialias=True`` bilinear (and PIL's)."""
    scale = _F32(in_size) / _F32(out_size)
    support, inv = (scale, _F32(1) / scale) if scale >= 1 else (_F32(1), _F32(1))
    centre = scale * (np.arange(out_size, dtype=_F32) + _F32(0.5))
    first = np.maximum((centre - support + _F32(0.5)).astype(np.int64), 0)
    count = np.minimum((centre + support + _F32(0.5)).astype(np.int64), in_size) - first
    j = np.arange(int(count.max()), dtype=_F32)[None]
    w = np.maximum(_F32(0), _F32(1) - np.abs((j + first[:, None].astype(_F32) - centre[:, None] + _F32(0.5)) * inv))
    w = np.where(j < count[:, None], w, _F32(0))
    total = np.zeros(out_size, _F32)
    for k in range(w.shape[1]):  # in torch's order, in float32
        total += w[:, k]
    return first, np.where(total[:, None] != 0, w / np.where(total != 0, total, _F32(1))[:, None], w).astype(_F32)


def _antialiased(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """Resample float32 ``x`` along ``axis`` to ``out_size`` with :func:`_antialiased_taps`."""
    x = np.moveaxis(x, axis, -1)
    first, w = _antialiased_taps(x.shape[-1], out_size)
    out = np.zeros(x.shape[:-1] + (out_size,), _F32)
    for k in range(w.shape[1]):  # taps past the end have weight 0
        out += x[..., np.minimum(first + k, x.shape[-1] - 1)] * w[:, k]
    return np.moveaxis(out, -1, axis)


def _bilinear(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """torch's plain bilinear (``align_corners=False``) along ``axis``: two taps, edges clamped."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    src = np.maximum((_F32(n) / _F32(out_size)) * (np.arange(out_size, dtype=_F32) + _F32(0.5)) - _F32(0.5), _F32(0))
    lo = src.astype(np.int64)
    frac = src - lo.astype(_F32)
    hi = lo + (lo < n - 1)
    return np.moveaxis(x[..., lo] * (_F32(1) - frac) + x[..., hi] * frac, -1, axis)


def resize(image: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
    """``(H, W, 3)`` pixels -> float32 ``(height, width, 3)``, bilinear, width first then height
    (torch's order); ``antialias`` widens the filter when shrinking (scene classifiers: always on)."""
    x = np.asarray(image, _F32)
    step = _antialiased if antialias else _bilinear
    if x.shape[1] != width:
        x = step(x, 1, width)
    if x.shape[0] != height:
        x = step(x, 0, height)
    return x


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """``(H, W, 3)`` uint8 RGB -> ``(size, size, 3)`` uint8 and the scale (input pixels per file pixel):
    the longer side scaled to ``size`` (antialiased when shrinking), padded bottom/right with PAD_RGB."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = min(size, round(h * scale)), min(size, round(w * scale))
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = PAD_RGB
    small = image
    if (new_h, new_w) != (h, w):
        small = np.clip(np.round(resize(image, new_h, new_w, antialias=scale < 1)), 0, 255).astype(np.uint8)
    canvas[:new_h, :new_w] = small
    return canvas, scale


def normalize(images: np.ndarray) -> np.ndarray:
    """``(B, S, S, 3)`` or ``(S, S, 3)`` uint8 RGB (already letterboxed to the input size) -> float32 NCHW."""
    x = np.asarray(images, dtype=np.float32)
    x = x[None] if x.ndim == 3 else x
    x = (x / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def corners(boxes: np.ndarray) -> np.ndarray:
    """``(N, 5)`` le90 boxes -> ``(N, 4, 2)`` corners, in order around the box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    cos, sin = np.cos(b[:, 4:5]), np.sin(b[:, 4:5])
    du = np.array([0.5, -0.5, -0.5, 0.5]) * b[:, 2:3]
    dv = np.array([0.5, 0.5, -0.5, -0.5]) * b[:, 3:4]
    return np.stack([b[:, 0:1] + du * cos - dv * sin, b[:, 1:2] + du * sin + dv * cos], axis=-1)


def _clip(poly: np.ndarray, count: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Sutherland-Hodgman step for every pair at once.

    ``poly (P, C, 2)`` holds ``count (P,)`` vertices each (the rest are padding); ``inside (P, C)``
    is the signed distance of each vertex to the clipping line (>= 0: kept side). Vertex i
    contributes itself if inside, and the crossing of edge i -> i+1 if the edge crosses the line.
    """
    p, c = inside.shape
    idx = np.arange(c)
    nxt = np.where(idx[None] + 1 < count[:, None], idx[None] + 1, 0)  # the next vertex, cyclically
    valid = idx[None] < count[:, None]
    s0, s1 = inside, np.take_along_axis(inside, nxt, 1)
    q = np.take_along_axis(poly, nxt[..., None], 1)
    keep_vertex = valid & (s0 >= 0)
    crosses = valid & ((s0 >= 0) != (s1 >= 0))
    t = np.where(crosses, s0 / np.where(crosses, s0 - s1, 1.0), 0.0)
    crossing = poly + t[..., None] * (q - poly)
    # Candidates in order: vertex 0, crossing 0, vertex 1, crossing 1, ...; a stable sort moves the
    # used ones to the front in that order (a convex polygon clipped by a line stays convex).
    cand = np.stack([poly, crossing], axis=2).reshape(p, 2 * c, 2)
    used = np.stack([keep_vertex, crosses], axis=2).reshape(p, 2 * c)
    order = np.argsort(~used, axis=1, kind="stable")[:, :c]  # a rectangle clipped 4 times has <= 8
    return np.take_along_axis(cand, order[..., None], 1), used.sum(1)


def _area(poly: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Shoelace area of ``poly (P, C, 2)`` with ``count`` vertices each (padding repeats vertex 0)."""
    idx = np.arange(poly.shape[1])
    filled = np.where((idx[None] < count[:, None])[..., None], poly, poly[:, :1])
    x, y = filled[..., 0], filled[..., 1]
    return 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))


def rotated_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` (both ``(P, 5)``): ``a``'s rectangle clipped by ``b``'s four sides."""
    a, b = np.asarray(a, np.float64).reshape(-1, 5), np.asarray(b, np.float64).reshape(-1, 5)
    p = len(a)
    poly = np.zeros((p, 8, 2))
    poly[:, :4] = corners(a)
    count = np.full(p, 4)
    cos, sin = np.cos(b[:, 4:5]), np.sin(b[:, 4:5])
    for axis, half in ((0, b[:, 2:3] / 2), (1, b[:, 3:4] / 2)):  # b's own axes: along w, along h
        for sign in (1.0, -1.0):
            dx, dy = poly[..., 0] - b[:, 0:1], poly[..., 1] - b[:, 1:2]
            along = dx * cos + dy * sin if axis == 0 else dy * cos - dx * sin
            poly, count = _clip(poly, count, half - sign * along)
    inter = _area(poly, count)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def rotated_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, by descending score: a box goes when a kept,
    higher-scored box of its class overlaps it with IoU > ``iou_threshold``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes, labels = boxes[order], np.asarray(labels)[order]
    radius = np.hypot(boxes[:, 2], boxes[:, 3]) / 2  # boxes farther apart than their radii cannot overlap
    alive = np.ones(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):  # one pass of the body per kept box: suppressed ones are skipped
        if not alive[i]:
            continue
        kept.append(i)
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        near = rest[
            (labels[rest] == labels[i]) & (np.hypot(*(boxes[rest, :2] - boxes[i, :2]).T) < radius[rest] + radius[i])
        ]
        if len(near):
            iou = rotated_iou_pairs(np.repeat(boxes[i : i + 1], len(near), 0), boxes[near])
            alive[near[iou > iou_threshold]] = False
    return order[np.asarray(kept, dtype=np.int64)]


def _best(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, top: int) -> dict[str, np.ndarray]:
    order = np.argsort(-scores, kind="stable")[:top]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order].astype(np.int64)}


def detections(
    outputs: dict[str, np.ndarray],
    num_images: int,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.1,
    max_per_image: int = 300,
) -> list[dict[str, np.ndarray]]:
    """Per image ``{"boxes", "scores", "labels"}`` from the graph's outputs by name (see module doc)."""
    boxes, scores, labels = outputs["boxes"], outputs["scores"], outputs["labels"]
    results = []
    for i in range(num_images):
        if "batch_index" in outputs:  # NMS done in the graph
            mine = (outputs["batch_index"] == i) & (scores > score_threshold)
            results.append(_best(boxes[mine], scores[mine], labels[mine], max_per_image))
            continue
        ok = scores[i] > score_threshold
        b, s, lab = boxes[i][ok], scores[i][ok], labels[i][ok]
        keep = rotated_nms(b, s, lab, iou_threshold)
        results.append(_best(b[keep], s[keep], lab[keep], max_per_image))
    return results


def inputs(
    names: list[str], images: np.ndarray, score_threshold: float = 0.05, iou_threshold: float = 0.1
) -> dict[str, np.ndarray]:
    """The feed of ``session.run`` for graph inputs ``names`` (HBB graphs take the NMS thresholds too)."""
    values = {
        "images": np.asarray(images, np.float32),
        "score_threshold": np.array([score_threshold], np.float32),
        "iou_threshold": np.array([iou_threshold], np.float32),
    }
    return {name: values[name] for name in names}
