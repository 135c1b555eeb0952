"""Geometric transforms of a :class:`Sample` that keep oriented boxes exact.

Box coordinates are continuous pixel coordinates (pixel ``(row i, col j)``
covers ``[j, j+1) x [i, i+1)``), so scaling the image by ``s`` scales every box
coordinate and size by ``s`` and keeps angles; only uniform scaling keeps a
rotated rectangle a rectangle, hence letterboxing instead of stretching.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from rkd.data.sample import Sample

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
