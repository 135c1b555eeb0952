"""A deterministic aerial-like detection set, generated on the fly.

Each image is a textured terrain (smoothed noise, striped fields, roads) with
oriented objects of up to three classes that differ in shape and colour:

* ``ship``: long light hull (aspect 3.5-6) with a pointed bow and a dark deck line,
* ``plane``: bluish-grey cross (fuselage, wings, tail plane),
* ``vehicle``: small saturated rounded rectangle with a dark windscreen,

plus unlabelled look-alikes that share either the shape or the colour of a
class but not both (rust-coloured barges, light square roofs, dark crosses,
round tanks in vehicle colours), so a detector has to use both cues.

Determinism: the layout of image ``i`` comes from ``numpy.random.default_rng([seed, i])``
and its pixels from ``default_rng([seed, i, 1])``; pixel maths uses only
``+ - * /``, ``sqrt`` and comparisons (correctly rounded in IEEE arithmetic,
unlike vectorised ``sin``/``exp``), and trigonometry is done once per shape
with Python's ``math``. The same seed gives the same pixels and boxes.
Shapes are rasterised with anti-aliased signed distances in each shape's
rotated frame, only inside its bounding window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from rkd.data.sample import DetectionRecord, Sample

CLASS_NAMES = ["ship", "plane", "vehicle"]

# Sizes are in pixels at image_size 256 and scale with the image.
REFERENCE_SIZE = 256
TERRAIN_RGB = np.array([[96, 110, 70], [132, 122, 96], [112, 112, 106], [84, 98, 80]], dtype=np.float32)
VEHICLE_RGB = [(205, 40, 40), (40, 75, 205), (230, 200, 40)]


@dataclass(frozen=True)
class Shape:
    """One drawn shape. ``length`` runs along the shape's axis at ``angle``, ``width`` across it."""

    kind: str  # key of SHAPES
    cx: float
    cy: float
    length: float
    width: float
    angle: float  # [-pi/2, pi/2), from +x towards +y
    heading: int  # +1 or -1: which end is the bow / nose
    colour: tuple[float, float, float]
    label: int  # class index, -1 for clutter


@dataclass(frozen=True)
class Layout:
    seed: int
    index: int
    size: int
    shapes: tuple[Shape, ...]


# --- signed distances (negative inside) in a shape's frame -------------------------------


def _box_sdf(u: np.ndarray, v: np.ndarray, length: float, width: float) -> np.ndarray:
    return np.maximum(np.abs(u) - length / 2, np.abs(v) - width / 2)


def _ship_sdf(u, v, length, width):
    # The bow tapers from full beam at length/2 - taper to a point at length/2.
    taper = 0.9 * width
    norm = math.sqrt((width / 2) ** 2 + taper**2)
    bow = ((u - length / 2) * (width / 2) + np.abs(v) * taper) / norm
    return np.maximum(_box_sdf(u, v, length, width), bow)


def _plane_sdf(u, v, length, span):
    fuselage = _box_sdf(u, v, length, 0.14 * span)
    wings = _box_sdf(u - 0.05 * length, v, 0.18 * length, span)
    tail = _box_sdf(u + 0.42 * length, v, 0.08 * length, 0.35 * span)
    return np.minimum(np.minimum(fuselage, wings), tail)


def _rounded_box_sdf(u, v, length, width):
    r = 0.25 * width
    qu, qv = np.abs(u) - (length / 2 - r), np.abs(v) - (width / 2 - r)
    outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0) - r


def _cross_sdf(u, v, length, width):
    return np.minimum(_box_sdf(u, v, length, 0.2 * width), _box_sdf(u, v, 0.2 * length, width))


def _disc_sdf(u, v, length, width):
    return np.sqrt(u * u + v * v) - length / 2


SHAPES = {
    "ship": _ship_sdf,
    "plane": _plane_sdf,
    "vehicle": _rounded_box_sdf,
    "barge": _box_sdf,
    "roof": _box_sdf,
    "cross": _cross_sdf,
    "tank": _disc_sdf,
}

# Dark detail drawn on top of a shape: (sdf of the detail, darkening factor).
DETAILS = {
    "ship": (lambda u, v, length, width: _box_sdf(u + 0.05 * length, v, 0.5 * length, 0.25 * width), 0.55),
    "vehicle": (lambda u, v, length, width: _box_sdf(u - 0.18 * length, v, 0.14 * length, 0.8 * width), 0.35),
}


# --- layout --------------------------------------------------------------------------------


def _object(rng: np.random.Generator, label: int, k: float) -> tuple[str, float, float, tuple]:
    """``(kind, length, width, colour)`` of a labelled object of class ``label``."""
    jitter = rng.uniform(-12, 12, size=3)
    if label == 0:
        length = rng.uniform(28, 60) * k
        width = max(length / rng.uniform(3.5, 6.0), 4.0 * k)
        return "ship", length, width, tuple(np.array([226, 226, 220]) + jitter)
    if label == 1:
        length = rng.uniform(24, 50) * k
        return "plane", length, length * rng.uniform(0.75, 0.95), tuple(np.array([176, 192, 218]) + jitter)
    length = rng.uniform(12, 20) * k
    colour = np.array(VEHICLE_RGB[rng.integers(len(VEHICLE_RGB))])
    return "vehicle", length, length / rng.uniform(1.8, 2.4), tuple(colour + jitter)


def _clutter(rng: np.random.Generator, num_classes: int, k: float) -> tuple[str, float, float, tuple]:
    """An unlabelled look-alike: the shape of one class in other colours, or its colour in another shape."""
    kinds = ["roof", "barge", "cross", "tank"][: 1 + num_classes]
    kind = kinds[rng.integers(len(kinds))]
    jitter = rng.uniform(-12, 12, size=3)
    if kind == "roof":  # ship-like colour, square-ish shape
        side = rng.uniform(16, 40) * k
        base = [(214, 214, 208), (150, 145, 140), (170, 112, 82)][rng.integers(3)]
        return kind, side, side / rng.uniform(1.0, 1.6), tuple(np.array(base) + jitter)
    if kind == "barge":  # ship-like shape, rust colour, no bow
        length = rng.uniform(28, 56) * k
        return kind, length, length / rng.uniform(3.5, 5.5), tuple(np.array([112, 70, 50]) + jitter)
    if kind == "cross":  # plane-like shape, dark vegetation / asphalt colour
        length = rng.uniform(24, 48) * k
        base = [(58, 74, 52), (82, 82, 88)][rng.integers(2)]
        return kind, length, length * rng.uniform(0.75, 0.95), tuple(np.array(base) + jitter)
    diameter = rng.uniform(12, 22) * k  # vehicle colours, round
    return kind, diameter, diameter, tuple(np.array(VEHICLE_RGB[rng.integers(len(VEHICLE_RGB))]) + jitter)


def make_layout(seed: int, index: int, size: int, num_classes: int, objects_per_image: tuple[int, int]) -> Layout:
    """Shapes of image ``index``: objects first (they never overlap each other), clutter after."""
    rng = np.random.default_rng([seed, index])
    k = size / REFERENCE_SIZE
    num_objects = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    num_clutter = int(rng.integers(2, 6))
    placed: list[Shape] = []
    for i in range(num_objects + num_clutter):
        label = int(rng.integers(num_classes)) if i < num_objects else -1
        kind, length, width, colour = _object(rng, label, k) if label >= 0 else _clutter(rng, num_classes, k)
        radius = 0.5 * math.hypot(length, width) + 2 * k
        angle = float(rng.uniform(-math.pi / 2, math.pi / 2))
        heading = 1 if rng.random() < 0.5 else -1
        for _ in range(30):  # rejection sampling; a shape that finds no room is dropped
            cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
            if all(math.hypot(cx - s.cx, cy - s.cy) > radius + 0.5 * math.hypot(s.length, s.width) for s in placed):
                colour = tuple(float(np.clip(c, 0, 255)) for c in colour)
                placed.append(Shape(kind, float(cx), float(cy), length, width, angle, heading, colour, label))
                break
    return Layout(seed, index, size, tuple(placed))


def layout_targets(layout: Layout) -> tuple[Tensor, Tensor]:
    """le90 boxes ``(N, 5)`` and labels ``(N,)`` of the labelled shapes (``length >= width`` by construction)."""
    objects = [s for s in layout.shapes if s.label >= 0]
    boxes = torch.tensor([[s.cx, s.cy, s.length, s.width, s.angle] for s in objects], dtype=torch.float32)
    labels = torch.tensor([s.label for s in objects], dtype=torch.long)
    return boxes.reshape(-1, 5), labels


# --- rendering -----------------------------------------------------------------------------


def _upsampled_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """Uniform noise on a ``grid x grid`` lattice, bilinearly interpolated to ``size x size``."""
    lattice = rng.uniform(-1, 1, size=(grid + 1, grid + 1)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (grid / size)
    i = np.minimum(t.astype(np.int64), grid - 1)
    f = t - i
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _frame(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates projected on the axis at ``angle`` and across it."""
    c = (np.arange(size, dtype=np.float32) + 0.5)[None, :]
    r = (np.arange(size, dtype=np.float32) + 0.5)[:, None]
    cos, sin = math.cos(angle), math.sin(angle)
    return c * cos + r * sin, r * cos - c * sin


def _terrain(rng: np.random.Generator, size: int) -> np.ndarray:
    k = size / REFERENCE_SIZE
    base = TERRAIN_RGB[rng.integers(len(TERRAIN_RGB))]
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    image = image + 18 * _upsampled_noise(rng, 4, size)[..., None]
    image = image + 8 * _upsampled_noise(rng, max(2, size // 12), size)[..., None]
    if rng.random() < 0.7:  # ploughed / cropped field: stripes on one side of a boundary
        along, across = _frame(size, float(rng.uniform(0, math.pi)))
        period = rng.uniform(8, 22) * k
        stripes = np.where((along / period) % 1.0 < 0.5, 1.0, -1.0).astype(np.float32)
        inside = (across > rng.uniform(0.2, 0.8) * size * 1.2).astype(np.float32)
        tint = rng.uniform(-1, 1, size=3).astype(np.float32) * 14
        image = image + (stripes * 9)[..., None] * inside[..., None] + tint * inside[..., None]
    for _ in range(int(rng.integers(0, 3))):  # roads
        along, across = _frame(size, float(rng.uniform(0, math.pi)))
        half = rng.uniform(3, 7) * k
        centre = rng.uniform(-0.3, 1.0) * size
        alpha = np.clip(half + 0.5 - np.abs(along - centre), 0, 1)[..., None]
        asphalt = np.array([78, 78, 82], dtype=np.float32) + rng.uniform(-8, 8)
        image = image * (1 - alpha) + asphalt * alpha
    return image


def _draw(image: np.ndarray, shape: Shape, k: float) -> None:
    """Composite ``shape`` (with its shadow and detail) into ``image`` in place."""
    size = image.shape[0]
    shadow = 1.5 * k
    reach = 0.5 * math.hypot(shape.length, shape.width) + shadow + 2
    x0, x1 = max(0, int(shape.cx - reach)), min(size, int(math.ceil(shape.cx + reach)))
    y0, y1 = max(0, int(shape.cy - reach)), min(size, int(math.ceil(shape.cy + reach)))
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :] - shape.cx
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None] - shape.cy
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    window = image[y0:y1, x0:x1]

    def coverage(sdf, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        u = ((xs - dx) * cos + (ys - dy) * sin) * shape.heading
        v = (ys - dy) * cos - (xs - dx) * sin
        return np.clip(0.5 - sdf(u, v, shape.length, shape.width), 0, 1)[..., None]

    sdf = SHAPES[shape.kind]
    window *= 1 - 0.45 * coverage(sdf, shadow, shadow)  # sun from the upper left
    alpha = coverage(sdf)
    window[...] = window * (1 - alpha) + np.asarray(shape.colour, dtype=np.float32) * alpha
    if shape.kind in DETAILS:
        detail_sdf, darken = DETAILS[shape.kind]
        window *= 1 - (1 - darken) * coverage(detail_sdf)


def render_image(layout: Layout) -> Tensor:
    """The ``(3, S, S)`` uint8 pixels of a layout (module-level, so records pickle)."""
    rng = np.random.default_rng([layout.seed, layout.index, 1])
    image = _terrain(rng, layout.size)
    k = layout.size / REFERENCE_SIZE
    for shape in layout.shapes:
        _draw(image, shape, k)
    image = image + rng.uniform(-6, 6, size=image.shape).astype(np.float32)  # sensor noise
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class SyntheticAerial:
    """``num_images`` generated images of ``image_size`` pixels (see module doc).

    >>> data = SyntheticAerial(2, 128, num_classes=2, seed=3)
    >>> data.class_names, len(data), tuple(data[0].image.shape)
    (['ship', 'plane'], 2, (3, 128, 128))
    """

    def __init__(
        self,
        num_images: int,
        image_size: int,
        num_classes: int = 3,
        seed: int = 0,
        objects_per_image: tuple[int, int] = (3, 8),
    ) -> None:
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be 1..{len(CLASS_NAMES)}, got {num_classes}")
        if num_images < 0 or image_size < 32:
            raise ValueError(f"need num_images >= 0 and image_size >= 32, got {num_images}, {image_size}")
        lo, hi = objects_per_image
        if not 0 <= lo <= hi:
            raise ValueError(f"objects_per_image must be (lo, hi) with 0 <= lo <= hi, got {objects_per_image}")
        self.class_names = CLASS_NAMES[:num_classes]
        self.image_size = image_size
        self.layouts = [make_layout(seed, i, image_size, num_classes, (lo, hi)) for i in range(num_images)]
        self.records = [self._record(layout) for layout in self.layouts]

    @staticmethod
    def _record(layout: Layout) -> DetectionRecord:
        boxes, labels = layout_targets(layout)
        return DetectionRecord(
            image_id=f"synthetic-{layout.seed}-{layout.index:05d}",
            image_size=(layout.size, layout.size),
            boxes=boxes,
            labels=labels,
            difficult=torch.zeros(len(labels), dtype=torch.bool),
            render=partial(render_image, layout),
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.records[index].load()
