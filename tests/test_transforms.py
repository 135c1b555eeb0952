"""Augmentations keep le90 boxes on their objects: pixels of a drawn box vs the transformed box, drawn again."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from shapely.geometry import Polygon
from torchvision.transforms.v2 import functional as TF

from rkd.data.sample import Sample
from rkd.data.tiling import Window
from rkd.data.transforms import (
    color_jitter,
    flip,
    letterbox,
    random_color_jitter,
    random_rot90,
    random_scale_crop,
    rot90,
    scale_crop,
    to_tv_boxes,
)
from rkd.geometry import obb_to_poly


def draw_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixels (H, W) whose centre lies in the box (float64 half-plane tests; pixel (i, j) centre is (j+.5, i+.5)).

    Centre sampling treats every direction alike, unlike PIL's polygon fill, whose
    edge rule leans one way and so would turn with a rotated image.
    """
    corners = obb_to_poly(box.double()[None])[0].view(4, 2)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij"
    )
    sides = []
    for k in range(4):
        (x0, y0), (x1, y1) = corners[k].tolist(), corners[(k + 1) % 4].tolist()
        sides.append((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0))
    sides = torch.stack(sides)
    return (sides >= 0).all(0) | (sides <= 0).all(0)


def test_draw_mask_matches_pil_within_a_pixel():
    box = torch.tensor([40.0, 30, 50, 20, 0.6])
    canvas = Image.new("L", (80, 60), 0)
    corners = (obb_to_poly(box.double()[None])[0].view(4, 2) - 0.5).tolist()  # PIL: integer = pixel centre
    ImageDraw.Draw(canvas).polygon([tuple(c) for c in corners], fill=255)
    pil, ours = torch.from_numpy(np.array(canvas) > 127), draw_mask(box, 60, 80)
    assert abs(int(ours.sum()) - 1000) < 40 and not (pil & ~dilate(ours)).any() and not (ours & ~dilate(pil)).any()


def sample_with_box(box: torch.Tensor, h: int, w: int) -> Sample:
    mask = draw_mask(box, h, w)
    image = (mask.to(torch.uint8) * 255)[None].expand(3, h, w).clone()
    return Sample(image, box[None].float(), torch.tensor([1]), torch.tensor([False]), "img", (h, w))


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def assert_same_pixels_within_1px(out: Sample) -> None:
    """The transformed image's object and the drawn transformed box agree up to one pixel."""
    assert len(out.boxes) == 1
    moved = out.image[0] > 127
    drawn = draw_mask(out.boxes[0], *out.image.shape[-2:])
    assert drawn.sum() > 0
    assert not (moved & ~dilate(drawn)).any(), "pixels of the moved object outside the drawn box"
    assert not (drawn & ~dilate(moved)).any(), "pixels of the drawn box missing from the moved object"


def random_box(h: int, w: int, g: torch.Generator, margin: float = 0.0, region=None) -> torch.Tensor:
    """A random le90 box lying wholly inside the image (or inside ``region`` = x0, y0, x1, y1)."""
    x_lo, y_lo, x_hi, y_hi = region or (0, 0, w, h)
    u = torch.rand(5, generator=g, dtype=torch.float64)
    long, short = 12 + 40 * u[2], 6 + 24 * u[3]
    short = min(short, long)
    reach = (long + short) / 2 + margin  # half the diagonal bound, so any angle stays inside
    cx = x_lo + reach + u[0] * (x_hi - x_lo - 2 * reach)
    cy = y_lo + reach + u[1] * (y_hi - y_lo - 2 * reach)
    return torch.tensor([cx, cy, long, short, (u[4] - 0.5) * math.pi])


# name: (transform, the part of the 110 x 190 source image that stays visible)
CASES = {
    "hflip": (lambda s: flip(s, True, False), None),
    "vflip": (lambda s: flip(s, False, True), None),
    "hvflip": (lambda s: flip(s, True, True), None),
    "rot90_k1": (lambda s: rot90(s, 1), None),
    "rot90_k2": (lambda s: rot90(s, 2), None),
    "rot90_k3": (lambda s: rot90(s, 3), None),
    "letterbox_down": (lambda s: letterbox(s, 96)[0], None),
    "letterbox_up": (lambda s: letterbox(s, 224)[0], None),
    "scale_crop_down": (lambda s: scale_crop(s, 0.8, Window(8, 4, 140, 84)), (10, 5, 175, 105)),
    "scale_crop_up": (lambda s: scale_crop(s, 1.5, Window(30, 15, 270, 160)), (20, 10, 180, 106)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transformed_pixels_match_transformed_boxes(name):
    transform, region = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    for _ in range(12):
        h, w = 110, 190
        box = random_box(h, w, g, margin=1, region=region)
        assert_same_pixels_within_1px(transform(sample_with_box(box, h, w)))


def test_rot90_matches_the_rotation_formula_and_four_turns_are_identity():
    g = torch.Generator().manual_seed(5)
    h, w = 80, 130
    boxes = torch.stack([random_box(h, w, g) for _ in range(30)]).float()
    sample = Sample(
        torch.zeros(3, h, w, dtype=torch.uint8),
        boxes,
        torch.zeros(30, dtype=torch.long),
        torch.zeros(30, dtype=torch.bool),
        "a",
        (h, w),
    )
    out = rot90(sample, 1)
    # Independent float64 reference: a quarter turn counter-clockwise as displayed maps (x, y) -> (y, W - x).
    corners = obb_to_poly(boxes.double()).view(-1, 4, 2)
    expected = torch.stack([corners[..., 1], w - corners[..., 0]], dim=-1)
    for ours, ref in zip(obb_to_poly(out.boxes.double()).view(-1, 4, 2), expected):
        a, b = Polygon(ours.tolist()), Polygon(ref.tolist())
        assert a.symmetric_difference(b).area < 1e-3 * b.area
    assert (out.boxes[:, 2] >= out.boxes[:, 3]).all()
    assert ((out.boxes[:, 4] >= -math.pi / 2) & (out.boxes[:, 4] < math.pi / 2)).all()
    back = sample
    for _ in range(4):
        back = rot90(back, 1)
    for ours, ref in zip(obb_to_poly(back.boxes.double()).view(-1, 4, 2), corners):
        assert Polygon(ours.tolist()).symmetric_difference(Polygon(ref.tolist())).area < 1e-2
    kinds = {tuple(random_rot90(sample, torch.Generator().manual_seed(s)).image.shape) for s in range(12)}
    assert kinds == {(3, h, w), (3, w, h)}


def test_torchvision_rotated_box_convention_is_converted_right():
    """torchvision's CXCYWHR corners (degrees, counter-clockwise) are the same rectangle as rkd's le90 box."""
    boxes = torch.tensor([[30.0, 20, 16, 6, 0.4], [50, 40, 20, 10, -1.2], [10, 10, 8, 8, -math.pi / 2]])
    tv = TF.convert_bounding_box_format(to_tv_boxes(boxes, (80, 80)), new_format="XYXYXYXY")
    for a, b in zip(tv.as_subclass(torch.Tensor).double().view(-1, 4, 2), obb_to_poly(boxes.double()).view(-1, 4, 2)):
        assert Polygon(a.tolist()).symmetric_difference(Polygon(b.tolist())).area < 1e-3


def test_scale_crop_drops_and_flags_objects_like_tiling():
    boxes = torch.tensor([[20.0, 20, 20, 10, 0], [96, 50, 20, 10, 0], [104, 50, 20, 10, 0], [150, 150, 20, 10, 0]])
    flags = torch.zeros(4, dtype=torch.bool)
    sample = Sample(torch.zeros(3, 200, 200, dtype=torch.uint8), boxes, torch.arange(4), flags, "a", (200, 200))
    out = scale_crop(sample, 0.5, Window(0, 0, 50, 50))
    # At half scale the crop ends at x = 50: object 1 spans 43..53 (70% inside, kept and cut), object 2 47..57 (30%).
    assert out.labels.tolist() == [0, 1] and out.difficult.tolist() == [False, True]
    torch.testing.assert_close(out.boxes, torch.tensor([[10.0, 10, 10, 5, 0], [46.5, 25, 7, 5, 0]]))
    assert out.scale == 0.5 and tuple(out.image.shape) == (3, 50, 50)
    with pytest.raises(ValueError, match="not inside the scaled image"):
        scale_crop(sample, 0.5, Window(0, 0, 120, 50))


def test_random_scale_crop_is_reproducible_and_bounded():
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([random_box(300, 400, g) for _ in range(40)]).float()
    sample = Sample(
        torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8, generator=g),
        boxes,
        torch.zeros(40, dtype=torch.long),
        torch.zeros(40, dtype=torch.bool),
        "a",
        (300, 400),
    )
    a = random_scale_crop(sample, 128, (0.5, 1.5), generator=torch.Generator().manual_seed(7))
    b = random_scale_crop(sample, 128, (0.5, 1.5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)
    shapes = set()
    for seed in range(20):
        out = random_scale_crop(sample, 128, (0.2, 1.5), generator=torch.Generator().manual_seed(seed))
        shapes.add(tuple(out.image.shape))
        assert out.image.shape[-1] <= 128 and out.image.shape[-2] <= 128
        assert 0.2 <= out.scale <= 1.5
        # Every kept object has its centre near the crop (>= 70% of it is inside).
        assert ((out.boxes[:, 0] > -out.boxes[:, 2]) & (out.boxes[:, 0] < 128 + out.boxes[:, 2])).all()
    assert (3, 128, 128) in shapes and len(shapes) > 1  # small scales give crops smaller than 128


def test_color_jitter_changes_pixels_not_boxes():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[10.0, 10, 8, 4, 0.2]])
    sample = Sample(image, boxes, torch.tensor([0]), torch.tensor([False]), "a", (20, 30))
    bright = color_jitter(sample, brightness=1.3)
    expected = (image.double() * 1.3).clamp(0, 255)
    assert (bright.image.double() - expected).abs().max() <= 1
    grey = color_jitter(sample, saturation=0.0).image.double()
    luma = 0.299 * image[0].double() + 0.587 * image[1].double() + 0.114 * image[2].double()
    assert (grey - luma).abs().max() <= 1.5 and torch.equal(grey[0], grey[1])
    flat = color_jitter(sample, contrast=0.0).image.double()
    assert flat.max() - flat.min() <= 1  # no contrast: every pixel is the mean grey
    out = random_color_jitter(sample, 0.3, 0.3, 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.boxes, boxes) and not torch.equal(out.image, image)
