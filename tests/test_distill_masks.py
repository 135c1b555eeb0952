"""GT foreground masks: every cell a box overlaps (positive area) is foreground, against a float64
brute force (shapely polygon intersection per cell), and tiny boxes between cell centres survive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distill_helpers import corners, make_info, make_output, make_targets, touches_cell
from shapely.geometry import Polygon

from rkd.distill.detection.fgd import fgd_masks
from rkd.distill.masks import cells_touching_boxes, centerness_instance_masks, foreground_masks
from rkd.outputs import Targets


def ref_touched(box, h: int, w: int, stride: float) -> np.ndarray:
    """``(h, w)`` bool by brute force: the cell ``[x s, (x+1) s) x [y s, (y+1) s)`` overlaps the box with area > 0."""
    poly = Polygon(corners(box))
    return np.array([[touches_cell(poly, x, y, stride) for x in range(w)] for y in range(h)])


def one_box(box, image_size=(64, 64), strides=(8, 16)):
    info = make_info(channels=(4,) * len(strides), strides=strides)
    out = make_output(info, image_size=image_size, batch=1)
    return Targets([torch.tensor([box])], [torch.tensor([0])], image_size), out


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 4, -math.pi / 2])
def test_tiny_box_between_cell_centres_is_foreground_at_every_level(angle):
    # 7x7 px centred on a corner shared by four cells at stride 8 and at stride 16: no cell centre
    # (4, 12, 20 ... and 8, 24 ...) lies inside, yet the box covers parts of four cells per level.
    tg, out = one_box([16.0, 16.0, 7.0, 7.0, angle])
    fg = foreground_masks(tg, out)
    fgd_fg, _ = fgd_masks(tg, out)
    cid = centerness_instance_masks(tg, out)
    for lvl, s in enumerate((8, 16)):
        want = ref_touched(tg.boxes[0][0].tolist(), 64 // s, 64 // s, s)
        assert want.sum() == 4
        np.testing.assert_array_equal(fg[lvl][0, 0].numpy() > 0, want)
        np.testing.assert_array_equal(fgd_fg[lvl][0, 0].numpy() > 0, want)
        np.testing.assert_array_equal(cid[lvl][0, 0].numpy() > 0, want)
        np.testing.assert_allclose(fgd_fg[lvl][0, 0].numpy()[want], 0.25)  # 1 / (cells of the box)
    assert sum(float(m.sum()) for m in cid) == pytest.approx(1.0, rel=1e-6)  # the instance still counts once


@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("rotate", [False, True])
def test_box_covering_exact_cells_gets_exactly_those(stride, rotate):
    # xyxy [a s, b s) per axis: cells a..b-1; neighbours share only an edge (zero area) and stay background.
    (ax, bx), (ay, by) = (1, 3), (0, 2)
    x1, x2, y1, y2 = ax * stride, bx * stride, ay * stride, by * stride
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    # the same rectangle as a le90 box turned by -90 deg (w and h swap; cos(pi/2) is not exactly 0 in float)
    box = [cx, cy, h, w, -math.pi / 2] if rotate else [cx, cy, w, h, 0.0]
    tg, out = one_box(box, strides=(stride,))
    got = foreground_masks(tg, out)[0][0, 0].numpy()
    want = np.zeros_like(got)
    want[ay:by, ax:bx] = 1
    np.testing.assert_array_equal(got, want)
    xyxy = Targets([torch.tensor([[float(x1), float(y1), float(x2), float(y2)]])], [torch.tensor([0])], (64, 64))
    np.testing.assert_array_equal(foreground_masks(xyxy, out)[0][0, 0].numpy(), want)


def test_touching_cells_match_brute_force_overlap():
    gen = torch.Generator().manual_seed(3)
    n = 40
    boxes = torch.cat(
        [
            torch.rand(n, 2, generator=gen) * 64,
            0.5 + torch.rand(n, 2, generator=gen) * 30,
            (torch.rand(n, 1, generator=gen) - 0.5) * math.pi,
        ],
        -1,
    )
    for stride in (4, 8, 16):
        side = 64 // stride
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        centres = torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5], -1).float() * stride
        got = cells_touching_boxes(centres, stride, boxes).numpy()  # (P, M)
        want = np.stack([ref_touched(b, side, side, stride).flatten() for b in boxes.tolist()], -1)
        np.testing.assert_array_equal(got, want)
        assert want.sum() > n  # not trivially empty
    # zero-size boxes cover no area
    assert not cells_touching_boxes(centres, 16, torch.tensor([[8.0, 8.0, 0.0, 5.0, 0.0]])).any()


def test_foreground_masks_with_make_targets_match_brute_force():
    info = make_info(channels=(4, 4, 4), strides=(4, 8, 16))
    out = make_output(info, image_size=(64, 48), batch=3)
    tg = make_targets((64, 48), batch=3)
    for m, s in zip(foreground_masks(tg, out), (4, 8, 16)):
        h, w = 64 // s, 48 // s
        for i in range(3):
            want = np.zeros((h, w), dtype=bool)
            for b in tg.boxes[i].tolist():
                want |= ref_touched(b, h, w, s)
            np.testing.assert_array_equal(m[i, 0].numpy() > 0, want)
