"""Geometric transforms of a :class:`Sample` that keep oriented boxes exact.

Box coordinates are continuous pixel coordinates (pixel ``(row i, col j)``
covers ``[j, j+1) x [i, i+1)``), so scaling the image by ``s`` scales every box
coordinate and size by ``s`` and keeps angles; only uniform scaling keeps a
rotated rectangle a rectangle, hence letterboxing instead of stretching.

Training augmentations: :func:`rot90`, :func:`scale_crop` (objects mostly
outside the crop are dropped, cut ones clipped and flagged difficult, exactly
as in :mod:`rkd.data.tiling`) and :func:`color_jitter`, each with a ``random_``
variant. :func:`rot90` uses torchvision's rotated boxes (``tv_tensors``
``CXCYWHR``), whose angle is in *degrees, counter-clockwise as displayed*
(the w-axis is ``(cos r, -sin r)`` with y down), while rkd's le90 angle turns
from +x towards +y, i.e. clockwise as displayed: ``r = -degrees(angle)``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from rkd.data.sample import Sample
from rkd.data.tiling import DEFAULT_MIN_AREA_FRACTION, Window, crop_targets
from rkd.geometry.boxes import normalize_le90

# Padding colour: the ImageNet mean, so padded pixels become ~0 after normalisation.
PAD_RGB = (124, 116, 104)


def letterbox(sample: Sample, size: int) -> tuple[Sample, float]:
    """Scale uniformly so the longer side is ``size``, pad bottom/right to ``size x size``.

    Returns the new sample and the scale factor (new pixels per old pixel).

    >>> s = Sample(torch.zeros(3, 50, 100, dtype=torch.uint8), torch.tensor([[50., 25, 20, 10, 0.3]]),
    ...            torch.tensor([0]), torch.tensor([False]), "a", (50, 100))
    >>> out, scale = letterbox(s, 64)
    >>> tuple(out.image.shape), scale, [round(v, 4) for v in out.boxes[0].tolist()]
    ((3, 64, 64), 0.64, [32.0, 16.0, 12.8, 6.4, 0.3])
    """
    _, height, width = sample.image.shape
    scale = size / max(height, width)
    new_h, new_w = min(size, round(height * scale)), min(size, round(width * scale))
    image = sample.image
    if (new_h, new_w) != (height, width):
        resized = F.interpolate(
            image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1
        )[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    if (new_h, new_w) != (size, size):
        canvas = torch.tensor(PAD_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()
        canvas[:, :new_h, :new_w] = image
        image = canvas
    boxes = sample.boxes.clone()
    boxes[:, :4] *= scale
    return replace(sample, image=image, boxes=boxes, scale=sample.scale * scale), scale


def flip(sample: Sample, horizontal: bool, vertical: bool) -> Sample:
    """Mirror the image (and boxes) left-right and/or top-bottom.

    A mirror negates the angle; ``w >= h`` is kept, so le90 only needs the
    angle wrapped back into ``[-pi/2, pi/2)`` (``-(-pi/2)`` is ``pi/2``).
    """
    if not (horizontal or vertical):
        return sample
    _, height, width = sample.image.shape
    image, boxes = sample.image, sample.boxes.clone()
    if horizontal:
        image = image.flip(-1)
        boxes[:, 0] = width - boxes[:, 0]
        boxes[:, 4] = -boxes[:, 4]
    if vertical:
        image = image.flip(-2)
        boxes[:, 1] = height - boxes[:, 1]
        boxes[:, 4] = -boxes[:, 4]
    boxes[:, 4] = torch.where(boxes[:, 4] >= math.pi / 2, boxes[:, 4] - math.pi, boxes[:, 4])
    return replace(sample, image=image.contiguous(), boxes=boxes)


def random_flip(
    sample: Sample, p_horizontal: float = 0.5, p_vertical: float = 0.5, generator: torch.Generator | None = None
) -> Sample:
    """:func:`flip` each way with its probability (aerial images have no "up").

    Without ``generator`` torch's default generator is used, which a DataLoader
    seeds differently in each worker.
    """
    draws = torch.rand(2, generator=generator)
    return flip(sample, horizontal=bool(draws[0] < p_horizontal), vertical=bool(draws[1] < p_vertical))


def to_tv_boxes(boxes: Tensor, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    """le90 boxes (N, 5) as torchvision ``CXCYWHR`` boxes (degrees, counter-clockwise), never clamped.

    >>> [round(v, 4) for v in to_tv_boxes(torch.tensor([[5.0, 5, 4, 2, math.pi / 6]]), (10, 10))[0].tolist()]
    [5.0, 5.0, 4.0, 2.0, -30.0]
    """
    tv = torch.cat([boxes[:, :4], -torch.rad2deg(boxes[:, 4:5])], dim=1)
    return tv_tensors.BoundingBoxes(tv, format="CXCYWHR", canvas_size=canvas_size, clamping_mode=None)


def from_tv_boxes(boxes: Tensor) -> Tensor:
    """torchvision ``CXCYWHR`` boxes (N, 5) back to le90 (the inverse of :func:`to_tv_boxes`)."""
    t = boxes.as_subclass(Tensor)
    return normalize_le90(torch.cat([t[:, :4], -torch.deg2rad(t[:, 4:5])], dim=1)).to(torch.float32)


def rot90(sample: Sample, k: int) -> Sample:
    """Turn the image (and boxes) by ``k`` quarter turns counter-clockwise as displayed (``torch.rot90``).

    The pixels move exactly (no resampling); boxes keep their sizes, their angle turns by ``-k pi/2``.

    >>> s = Sample(torch.zeros(3, 40, 60, dtype=torch.uint8), torch.tensor([[20.0, 10, 12, 4, 0.5]]),
    ...            torch.tensor([0]), torch.tensor([False]), "a", (40, 60))
    >>> out = rot90(s, 1)
    >>> tuple(out.image.shape), [round(v, 4) for v in out.boxes[0].tolist()]
    ((3, 60, 40), [10.0, 40.0, 12.0, 4.0, -1.0708])
    """
    k = k % 4
    if k == 0:
        return sample
    _, height, width = sample.image.shape
    image = TF.rotate(tv_tensors.Image(sample.image), 90.0 * k, expand=True).as_subclass(Tensor)
    boxes = TF.rotate(to_tv_boxes(sample.boxes.float(), (height, width)), 90.0 * k, expand=True)
    return replace(sample, image=image.contiguous(), boxes=from_tv_boxes(boxes))


def random_rot90(sample: Sample, generator: torch.Generator | None = None) -> Sample:
    """:func:`rot90` by 0, 1, 2 or 3 quarter turns, equally likely."""
    return rot90(sample, int(torch.randint(0, 4, (1,), generator=generator)))


def scale_crop(
    sample: Sample, scale: float, window: Window, min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION
) -> Sample:
    """Scale the image by ``scale``, then cut ``window`` (pixels of the scaled image) out of it.

    Objects with less than ``min_area_fraction`` of their area in the window are
    dropped; cut ones become the minimum-area rectangle of their visible part and
    are flagged difficult (:func:`rkd.data.tiling.crop_targets`). The window must
    lie inside the scaled image, ``floor(H * scale) x floor(W * scale)``.

    >>> s = Sample(torch.zeros(3, 100, 100, dtype=torch.uint8), torch.tensor([[20.0, 20, 8, 4, 0], [90, 90, 8, 4, 0]]),
    ...            torch.tensor([0, 1]), torch.tensor([False, False]), "a", (100, 100))
    >>> out = scale_crop(s, 0.5, Window(5, 5, 45, 45))
    >>> tuple(out.image.shape), out.boxes.tolist(), out.labels.tolist()
    ((3, 40, 40), [[5.0, 5.0, 4.0, 2.0, 0.0]], [0])
    """
    image = sample.image
    if scale != 1:
        # A fixed scale factor (not a rounded output size) keeps x -> scale * x exact for the boxes.
        resized = F.interpolate(
            image[None].float(),
            scale_factor=scale,
            mode="bilinear",
            align_corners=False,
            antialias=scale < 1,
            recompute_scale_factor=False,
        )[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    new_h, new_w = image.shape[-2:]
    if not (0 <= window.x0 < window.x1 <= new_w and 0 <= window.y0 < window.y1 <= new_h):
        raise ValueError(f"window {tuple(window)} is not inside the scaled image ({new_h}, {new_w}) (H, W)")
    boxes = sample.boxes.clone()
    boxes[:, :4] *= scale
    targets = crop_targets(boxes, window, min_area_fraction)
    return replace(
        sample,
        image=image[:, window.y0 : window.y1, window.x0 : window.x1].contiguous(),
        boxes=targets.boxes,
        labels=sample.labels[targets.keep],
        difficult=sample.difficult[targets.keep] | targets.truncated,
        scale=sample.scale * scale,
    )


def random_scale_crop(
    sample: Sample,
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 1.5),
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    generator: torch.Generator | None = None,
) -> Sample:
    """:func:`scale_crop` at a uniform random scale, a ``crop_size`` square at a random place.

    Where the scaled image is smaller than ``crop_size`` the crop is the whole of
    that side (letterboxing afterwards pads it). The whole image is resized, so
    tile very large scenes first (:func:`rkd.data.tiling.tile_records`).
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
    draws = torch.rand(3, generator=generator, dtype=torch.float64)
    scale = low + (high - low) * float(draws[0])
    _, height, width = sample.image.shape
    scale = max(scale, 1 / min(height, width))  # never below one pixel per side
    new_h, new_w = math.floor(height * scale), math.floor(width * scale)
    crop_h, crop_w = min(crop_size, new_h), min(crop_size, new_w)
    y0 = int(draws[1] * (new_h - crop_h + 1)) if new_h > crop_h else 0
    x0 = int(draws[2] * (new_w - crop_w + 1)) if new_w > crop_w else 0
    y0, x0 = min(y0, new_h - crop_h), min(x0, new_w - crop_w)
    return scale_crop(sample, scale, Window(x0, y0, x0 + crop_w, y0 + crop_h), min_area_fraction)


def color_jitter(sample: Sample, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0) -> Sample:
    """Scale brightness, contrast and saturation by the given factors (1 = unchanged); boxes unchanged.

    >>> s = Sample(torch.full((3, 2, 2), 100, dtype=torch.uint8), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long),
    ...            torch.zeros(0, dtype=torch.bool), "a", (2, 2))
    >>> color_jitter(s, brightness=1.5).image[0, 0, 0].item()
    150
    """
    image = sample.image
    if brightness != 1:
        image = TF.adjust_brightness(image, brightness)
    if contrast != 1:
        image = TF.adjust_contrast(image, contrast)
    if saturation != 1:
        image = TF.adjust_saturation(image, saturation)
    return replace(sample, image=image)


def random_color_jitter(
    sample: Sample,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    generator: torch.Generator | None = None,
) -> Sample:
    """:func:`color_jitter` with each factor uniform in ``[1 - amount, 1 + amount]``."""
    amounts = torch.tensor([brightness, contrast, saturation], dtype=torch.float64)
    factors = 1 + amounts * (2 * torch.rand(3, generator=generator, dtype=torch.float64) - 1)
    b, c, s = factors.clamp_min(0).tolist()
    return color_jitter(sample, b, c, s)
