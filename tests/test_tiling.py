"""Tiling of large scenes (windows, clipping against shapely, lazy records, DOTA copies) and merging back."""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from rkd.data.dota import read_dota
from rkd.data.sample import DetectionRecord, Sample
from rkd.data.tiled_copy import add_tile_command, tile_dataset
from rkd.data.tiling import (
    Window,
    clip_polygons,
    crop_targets,
    patch_id,
    polygon_area,
    tile_records,
    tile_sample,
    tile_windows,
)
from rkd.data.ucas import read_ucas
from rkd.errors import DataError
from rkd.eval import evaluate_detections
from rkd.eval.merge import merge_patch_predictions, merge_patches, parse_patch_id
from rkd.geometry import obb_to_poly

UCAS = Path("/work/shared/data/ucas50")


def devkit_starts(length: int, size: int, gap: int) -> list[int]:
    """DOTA devkit's ImgSplit loop, transcribed as an independent reference."""
    starts, left = [], 0
    while True:
        if left + size >= length:
            left = max(length - size, 0)
        starts.append(left)
        if left + size >= length:
            return starts
        left += size - gap


def shapely_poly(corners) -> Polygon:
    return Polygon(np.asarray(corners, dtype=np.float64).reshape(-1, 2))


def random_boxes(n: int, h: int, w: int, seed: int, min_side: float = 4, max_side: float = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    a, b = min_side + (max_side - min_side) * u[:, 2], min_side + (max_side - min_side) * u[:, 3]
    long, short = torch.maximum(a, b), torch.minimum(a, b)
    return torch.stack([u[:, 0] * w, u[:, 1] * h, long, short, (u[:, 4] - 0.5) * math.pi], dim=1)


@pytest.mark.parametrize(
    "h, w, size, overlap",
    [(659, 1280, 1024, 200), (20000, 19999, 1024, 200), (300, 5000, 512, 0), (1024, 1025, 1024, 200)],
)
def test_windows_follow_the_devkit_and_cover_the_image(h, w, size, overlap):
    windows = tile_windows(h, w, size, overlap)
    ys, xs = devkit_starts(h, size, overlap), devkit_starts(w, size, overlap)
    assert [(win.x0, win.y0) for win in windows] == [(x, y) for y in ys for x in xs]
    assert all(win.x1 == min(win.x0 + size, w) and win.y1 == min(win.y0 + size, h) for win in windows)
    assert max(win.x1 for win in windows) == w and max(win.y1 for win in windows) == h  # last one flush
    for starts, length in ((xs, w), (ys, h)):
        ends = [min(s + size, length) for s in starts]
        assert all(e - s2 >= min(overlap, length) for e, s2 in zip(ends, starts[1:]))  # neighbours overlap


def test_bad_tiling_arguments_are_data_errors():
    with pytest.raises(DataError, match="tile overlap 1024 must be >= 0 and smaller than the tile size 1024"):
        tile_windows(2000, 2000, 1024, 1024)


def test_clipping_matches_shapely():
    boxes = random_boxes(400, 300, 300, seed=1)
    window = Window(60, 40, 240, 200)
    polys = obb_to_poly(boxes)
    clipped = clip_polygons(polys, window)
    rect = shapely_poly([60, 40, 240, 40, 240, 200, 60, 200])
    expected = torch.tensor([shapely_poly(p).intersection(rect).area for p in polys.tolist()], dtype=torch.float64)
    torch.testing.assert_close(polygon_area(clipped), expected, rtol=1e-9, atol=1e-7)


def test_crop_targets_keep_drop_and_truncate_like_shapely():
    boxes = random_boxes(500, 300, 300, seed=2)
    window = Window(50, 70, 250, 230)
    rect = shapely_poly([50, 70, 250, 70, 250, 230, 50, 230])
    pieces = [shapely_poly(p).intersection(rect) for p in obb_to_poly(boxes).tolist()]
    fraction = np.array([piece.area for piece in pieces]) / (boxes[:, 2] * boxes[:, 3]).numpy()
    t = crop_targets(boxes, window, 0.7)
    assert t.keep.tolist() == np.nonzero(fraction >= 0.7)[0].tolist()
    assert t.truncated.tolist() == (fraction[t.keep.numpy()] < 1 - 1e-6).tolist()
    assert 0 < int(t.truncated.sum()) < len(t.keep)  # both kinds occur
    shifted = t.boxes.double().clone()
    shifted[:, 0] += 50
    shifted[:, 1] += 70
    for i, box, cut in zip(t.keep.tolist(), shifted, t.truncated.tolist()):
        if not cut:  # whole objects keep their box exactly (shifted)
            torch.testing.assert_close(box, boxes[i], rtol=0, atol=1e-4)
            continue
        # A cut object becomes the minimum-area rectangle of its visible part (shapely's, as a reference).
        ours = shapely_poly(obb_to_poly(box[None])[0].tolist())
        reference = pieces[i].minimum_rotated_rectangle
        assert ours.area == pytest.approx(reference.area, rel=1e-4)
        assert ours.buffer(1e-3).contains(pieces[i])


def scene_with_objects(h: int, w: int, seed: int) -> Sample:
    """Non-overlapping oriented objects on a grid (each smaller than the tile overlap) and a noise image."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(80, h - 80, 170.0), torch.arange(80, w - 80, 170.0), indexing="ij")
    n = ys.numel()
    u = torch.rand(n, 5, generator=g)
    boxes = torch.stack(
        [
            xs.flatten() + 20 * u[:, 0],
            ys.flatten() + 20 * u[:, 1],
            60 + 50 * u[:, 2],
            15 + 40 * u[:, 3],
            (u[:, 4] - 0.5) * math.pi,
        ],
        dim=1,
    )
    image = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=g)
    return Sample(image, boxes, labels, torch.zeros(n, dtype=torch.bool), "scene", (h, w))


def test_tile_sample_crops_pixels_and_targets():
    scene = scene_with_objects(1500, 2300, seed=3)
    patches = tile_sample(scene, 1024, 200, 0.7)
    assert [win for win, _ in patches] == tile_windows(1500, 2300, 1024, 200)
    for win, patch in patches:
        assert torch.equal(patch.image, scene.image[:, win.y0 : win.y1, win.x0 : win.x1])
        assert patch.image_id == patch_id("scene", win) and patch.orig_size == (win.height, win.width)
        t = crop_targets(scene.boxes, win, 0.7)
        assert torch.equal(patch.labels, scene.labels[t.keep]) and torch.equal(patch.difficult, t.truncated)
        assert torch.equal(patch.boxes, t.boxes)


def test_merging_patch_ground_truth_gives_back_the_scene():
    scene = scene_with_objects(2100, 2700, seed=4)
    patches = []
    for win, patch in tile_sample(scene, 1024, 200, 0.7):
        fraction = crop_targets(scene.boxes, win, 0.7).inside_fraction.float()
        patches.append((win, {"boxes": patch.boxes, "scores": fraction, "labels": patch.labels}))
    merged = merge_patches(patches, iou_threshold=0.3)
    assert len(merged["boxes"]) == len(scene.boxes)
    ours = [shapely_poly(p) for p in obb_to_poly(merged["boxes"].double()).tolist()]
    truth = [shapely_poly(p) for p in obb_to_poly(scene.boxes.double()).tolist()]
    for gt, label in zip(truth, scene.labels.tolist()):
        ious = [gt.intersection(p).area / gt.union(p).area for p in ours]
        best = int(np.argmax(ious))
        assert ious[best] > 0.99 and merged["labels"][best] == label
    gt = [{"boxes": scene.boxes, "labels": scene.labels}]
    assert evaluate_detections([merged], gt, num_classes=3).map == pytest.approx(1.0)
    # The same through patch ids, as predictions files name them.
    by_id = {patch_id("scene", win): det for win, det in patches}
    assert parse_patch_id(patch_id("scene__x", Window(824, 1076, 0, 0))) == ("scene__x", 824, 1076)
    again = merge_patch_predictions(by_id, 0.3)
    assert list(again) == ["scene"] and torch.equal(again["scene"]["boxes"], merged["boxes"])


def test_tile_records_are_lazy_picklable_and_match_tile_sample():
    records, _, _ = read_ucas(UCAS, "val")
    record = max(records, key=lambda r: len(r.labels))
    tiled = tile_records([record], 512, 100, 0.7)
    patches = tile_sample(record.load(), 512, 100, 0.7)
    assert len(tiled) == len(patches) > 2
    for rec, (win, patch) in zip(pickle.loads(pickle.dumps(tiled)), patches):
        assert isinstance(rec, DetectionRecord) and rec.image_id == patch.image_id
        assert rec.image_size == (win.height, win.width)
        loaded = rec.load()
        assert torch.equal(loaded.image, patch.image)
        assert torch.equal(loaded.boxes, patch.boxes) and torch.equal(loaded.difficult, patch.difficult)


def test_rkd_data_tile_writes_a_dota_copy_that_reads_back(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_tile_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "tiled"
    args = parser.parse_args(
        ["tile", str(UCAS), "--format", "ucas", "--out", str(out), "--split", "val"]
        + ["--size", "600", "--overlap", "150"]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("val: 9 images -> ")
    records, names, _ = read_ucas(UCAS, "val")
    expected = tile_records(records, 600, 150, 0.7)
    copy, copy_names, _ = read_dota(out, "val")  # the class order comes back from classes.txt
    assert copy_names == names and names != sorted(names)
    assert [r.image_id for r in copy] == sorted(r.image_id for r in expected)
    by_id = {r.image_id: r for r in expected}
    for rec in copy[:12]:
        ref = by_id[rec.image_id]
        assert torch.equal(rec.labels, ref.labels) and torch.equal(rec.difficult, ref.difficult)
        for a, b in zip(obb_to_poly(rec.boxes.double()).tolist(), obb_to_poly(ref.boxes.double()).tolist()):
            # The same rectangle (labels keep 2 decimals; a near-square may come back with w and h swapped).
            assert shapely_poly(a).symmetric_difference(shapely_poly(b)).area < 0.05 * math.sqrt(shapely_poly(b).area)
    assert torch.equal(copy[0].load_image(), by_id[copy[0].image_id].load_image())  # PNG is lossless
    with pytest.raises(DataError, match="unknown dataset format 'nope'"):
        tile_dataset(UCAS, "nope", "val", out)
