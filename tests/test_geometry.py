"""Geometry against independent references: shapely polygons and float64 numpy formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
import torch

from rkd.geometry import (
    batched_rotated_nms,
    box_area,
    hbb_iou,
    hbb_to_obb,
    normalize_le90,
    normalize_obb,
    obb_convert,
    obb_to_hbb,
    obb_to_poly,
    poly_to_obb,
    rotated_iou,
    rotated_iou_aligned,
    rotated_nms,
)


def corners_np(obbs: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners straight from the definition: c +- w/2 (cos a, sin a) +- h/2 (-sin a, cos a)."""
    obbs = np.asarray(obbs, dtype=np.float64)
    cx, cy, w, h, a = obbs.T
    u = np.stack([np.cos(a), np.sin(a)], -1) * (w / 2)[:, None]
    v = np.stack([-np.sin(a), np.cos(a)], -1) * (h / 2)[:, None]
    c = np.stack([cx, cy], -1)
    return np.stack([c + u + v, c - u + v, c - u - v, c + u - v], 1)


def shapely_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pa, pb = shapely.polygons(corners_np(a)), shapely.polygons(corners_np(b))
    inter = shapely.area(shapely.intersection(pa, pb))
    union = np.asarray(a, np.float64)[:, 2] * a[:, 3] + np.asarray(b, np.float64)[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def random_obbs(rng: np.random.Generator, n: int, span: float = 100.0) -> np.ndarray:
    return np.stack(
        [
            rng.uniform(0, span, n),
            rng.uniform(0, span, n),
            rng.uniform(0.5, 40, n),
            rng.uniform(0.5, 40, n),
            rng.uniform(-math.pi, math.pi, n),
        ],
        1,
    )


def hard_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that exercise the degenerate paths, n of each kind."""
    a_parts, b_parts = [], []
    base = random_obbs(rng, n)
    # identical
    a_parts.append(base), b_parts.append(base.copy())
    # zero area: a side of length 0, or a point
    z = base.copy()
    z[: n // 3, 2] = 0
    z[n // 3 : 2 * n // 3, 3] = 0
    z[2 * n // 3 :, 2:4] = 0
    a_parts.append(z), b_parts.append(base + rng.normal(0, 3, (n, 5)) * [1, 1, 0, 0, 0.2])
    # touching along a full edge (same size, shifted by w along the w-axis) or at a corner
    shift = base.copy()
    shift[:, 0] += base[:, 2] * np.cos(base[:, 4])
    shift[:, 1] += base[:, 2] * np.sin(base[:, 4])
    a_parts.append(base), b_parts.append(shift)
    corner = base.copy()
    corner[:, 0] += base[:, 2] * np.cos(base[:, 4]) - base[:, 3] * np.sin(base[:, 4])
    corner[:, 1] += base[:, 2] * np.sin(base[:, 4]) + base[:, 3] * np.cos(base[:, 4])
    a_parts.append(base), b_parts.append(corner)
    # nested: a small box of any angle well inside the big one
    inner = base.copy()
    small = np.minimum(base[:, 2], base[:, 3]) / 2 * rng.uniform(0.1, 0.7, n)
    inner[:, 2] = small
    inner[:, 3] = small * rng.uniform(0.2, 1, n)
    inner[:, 4] = rng.uniform(-math.pi, math.pi, n)
    a_parts.append(base), b_parts.append(inner)
    # parallel edges, partly overlapping; and axis-aligned boxes sharing edge lines
    par = base.copy()
    par[:, 0] += rng.uniform(-1, 1, n) * base[:, 2] * np.cos(base[:, 4])
    par[:, 1] += rng.uniform(-1, 1, n) * base[:, 2] * np.sin(base[:, 4])
    a_parts.append(base), b_parts.append(par)
    grid = np.round(base)
    grid[:, 4] = rng.choice([0.0, -math.pi / 2, math.pi / 2], n)
    grid2 = grid.copy()
    grid2[:, :4] = np.round(grid[:, :4] + rng.integers(-5, 6, (n, 4)))
    grid2[:, 2:4] = np.abs(grid2[:, 2:4])
    a_parts.append(grid), b_parts.append(grid2)
    # far from the origin (float32 centres only keep ~1e-3 px there)
    far = base.copy()
    far[:, :2] += 5000
    a_parts.append(far), b_parts.append(far + rng.normal(0, 5, (n, 5)) * [1, 1, 0.2, 0.2, 0.3])
    return np.concatenate(a_parts), np.concatenate(b_parts)


def test_rotated_iou_aligned_matches_shapely_on_10000_pairs_with_degenerate_ones():
    rng = np.random.default_rng(0)
    a_hard, b_hard = hard_pairs(rng, 500)  # 4000 degenerate / hard pairs
    a_rand = random_obbs(rng, 6000, span=40)
    b_rand = random_obbs(rng, 6000, span=40)
    b_rand[3000:] = a_rand[3000:] + rng.normal(0, 1, (3000, 5)) * [5, 5, 5, 5, 0.5]  # near misses and near hits
    a = np.concatenate([a_hard, a_rand])
    b = np.concatenate([b_hard, b_rand])
    b[:, 2:4] = np.abs(b[:, 2:4])
    assert len(a) >= 10_000
    ref = shapely_iou(a, b)
    got = rotated_iou_aligned(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < 1e-4
    assert (ref > 0.01).sum() > 5000, "the random pairs must mostly overlap to be a real test"
    # identical boxes of positive area give exactly (to rounding) 1
    assert np.allclose(got[:500], 1.0, atol=1e-9)
    # zero-area boxes give 0, not NaN
    assert np.all(got[500:1000] == 0)


def test_rotated_iou_float32_inputs_stay_within_1e4():
    rng = np.random.default_rng(1)
    a, b = hard_pairs(rng, 200)
    a32, b32 = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    got = rotated_iou_aligned(a32, b32)
    assert got.dtype == torch.float32
    ref = shapely_iou(a32.double().numpy(), b32.double().numpy())
    assert np.abs(got.double().numpy() - ref).max() < 1e-4


def test_rotated_iou_matrix_matches_shapely_and_chunks_agree():
    rng = np.random.default_rng(2)
    a = random_obbs(rng, 37, span=80)
    b = random_obbs(rng, 53, span=80)
    ref = shapely_iou(np.repeat(a, len(b), 0), np.tile(b, (len(a), 1))).reshape(len(a), len(b))
    full = rotated_iou(torch.from_numpy(a), torch.from_numpy(b))
    tiny_chunks = rotated_iou(torch.from_numpy(a), torch.from_numpy(b), chunk_pairs=7)
    assert full.shape == (37, 53)
    assert np.abs(full.numpy() - ref).max() < 1e-4
    assert torch.equal(full, tiny_chunks)
    # inputs are not modified, even float64 ones with negative sizes
    neg = torch.tensor([[0.0, 0.0, -2.0, 1.0, 0.0]], dtype=torch.float64)
    assert rotated_iou(neg, neg).item() == 0 and neg[0, 2] == -2.0
    assert rotated_iou(torch.zeros(0, 5), torch.from_numpy(b)).shape == (0, 53)


def test_iof_is_intersection_over_first_box_area():
    big = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.3]])
    small = torch.tensor([[0.0, 0.0, 2.0, 1.0, -1.0]])
    assert rotated_iou(small, big, mode="iof").item() == pytest.approx(1.0)
    assert rotated_iou(big, small, mode="iof").item() == pytest.approx(2.0 / 100.0)
    with pytest.raises(ValueError, match="mode"):
        rotated_iou(small, big, mode="dice")


def test_obb_to_poly_matches_definition_and_shapes_are_checked():
    rng = np.random.default_rng(3)
    obbs = random_obbs(rng, 100)
    got = obb_to_poly(obbs).numpy().reshape(-1, 4, 2)  # numpy input accepted
    np.testing.assert_allclose(got, corners_np(obbs), atol=1e-9)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        obb_to_poly(torch.zeros(3, 4))


def _same_corner_sets(p: np.ndarray, q: np.ndarray, atol: float) -> None:
    d = np.linalg.norm(p[:, :, None, :] - q[:, None, :, :], axis=-1)  # (N, 4, 4)
    assert d.min(2).max() < atol and d.min(1).max() < atol


def test_poly_to_obb_round_trip_any_vertex_order():
    rng = np.random.default_rng(4)
    obbs = random_obbs(rng, 400)
    obbs[:20, 3] = obbs[:20, 2]  # squares
    obbs[20:40, 4] = rng.choice([-math.pi / 2, 0.0, math.pi / 2, math.pi], 20)
    polys = corners_np(obbs)
    for perm in itertools.permutations(range(4)):  # every order, also self-crossing ones and both windings
        back = poly_to_obb(torch.from_numpy(polys[:, perm, :].reshape(-1, 8)))
        assert (back[:, 2] >= back[:, 3]).all()
        assert (back[:, 4] >= -math.pi / 2).all() and (back[:, 4] < math.pi / 2).all()
        _same_corner_sets(corners_np(back.numpy()), polys, atol=1e-6)
        np.testing.assert_allclose(back[:, 2] * back[:, 3], obbs[:, 2] * obbs[:, 3], rtol=1e-9)


def test_poly_to_obb_is_the_minimum_area_rectangle_of_general_quadrilaterals():
    rng = np.random.default_rng(5)
    polys = rng.uniform(0, 100, (300, 8))
    got = poly_to_obb(polys)
    ref_area = shapely.area(shapely.oriented_envelope(shapely.multipoints(polys.reshape(-1, 4, 2))))
    np.testing.assert_allclose((got[:, 2] * got[:, 3]).numpy(), ref_area, rtol=1e-6)
    # the rectangle encloses all 4 points
    cx, cy, w, h, a = got.numpy().T
    pts = polys.reshape(-1, 4, 2)
    dx, dy = pts[..., 0] - cx[:, None], pts[..., 1] - cy[:, None]
    assert (np.abs(dx * np.cos(a)[:, None] + dy * np.sin(a)[:, None]) <= w[:, None] / 2 + 1e-6).all()
    assert (np.abs(-dx * np.sin(a)[:, None] + dy * np.cos(a)[:, None]) <= h[:, None] / 2 + 1e-6).all()
    assert poly_to_obb(np.zeros((2, 8))).abs().sum() == 0  # all vertices equal: empty box, no NaN
    assert got.dtype == torch.float64 and poly_to_obb(torch.from_numpy(polys).float()).dtype == torch.float32


def test_normalize_le90_invariants():
    rng = np.random.default_rng(6)
    obbs = random_obbs(rng, 500)
    obbs[:, 4] = rng.uniform(-10, 10, 500)
    obbs[:50, 4] = rng.choice([-math.pi / 2, math.pi / 2, -math.pi, 0.0, math.pi * 3 / 2], 50)
    norm = normalize_le90(torch.from_numpy(obbs))
    assert (norm[:, 2] >= norm[:, 3]).all()
    assert (norm[:, 4] >= -math.pi / 2).all() and (norm[:, 4] < math.pi / 2).all()
    _same_corner_sets(corners_np(norm.numpy()), corners_np(obbs), atol=1e-9)
    assert torch.allclose(normalize_le90(norm), norm)  # idempotent


@pytest.mark.parametrize("dst", ["le90", "le135", "oc"])
def test_obb_convert_ranges_and_round_trip(dst):
    rng = np.random.default_rng(7)
    obbs = normalize_le90(random_obbs(rng, 500))
    conv = obb_convert(obbs, "le90", dst)
    a = conv[:, 4]
    if dst == "le135":
        assert (conv[:, 2] >= conv[:, 3]).all() and (a >= -math.pi / 4).all() and (a < 3 * math.pi / 4).all()
    elif dst == "oc":
        assert (a > 0).all() and (a <= math.pi / 2).all()
    _same_corner_sets(corners_np(conv.numpy()), corners_np(obbs.numpy()), atol=1e-9)
    back = obb_convert(conv, dst, "le90")
    _same_corner_sets(corners_np(back.numpy()), corners_np(obbs.numpy()), atol=1e-9)
    assert torch.allclose(back[:, 2:4], obbs[:, 2:4])
    with pytest.raises(ValueError, match="unknown angle convention 'le45'"):
        obb_convert(obbs, "le45", dst)
    # polygons convert straight into any convention
    from_polys = poly_to_obb(obb_to_poly(obbs), convention=dst)
    _same_corner_sets(corners_np(from_polys.numpy()), corners_np(obbs.numpy()), atol=1e-6)
    assert torch.allclose(from_polys[:, 4], conv[:, 4], atol=1e-6) or dst == "oc"


def test_oc_convention_examples():
    # a box along +x is, for OpenCV, the same box standing at pi/2 with sides swapped
    got = normalize_obb(torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0], [0.0, 0.0, 4.0, 2.0, 0.5]]), "oc")
    assert torch.allclose(got, torch.tensor([[0.0, 0.0, 2.0, 4.0, math.pi / 2], [0.0, 0.0, 4.0, 2.0, 0.5]]))


def test_hbb_conversions_and_areas():
    rng = np.random.default_rng(8)
    obbs = random_obbs(rng, 200)
    hbb = obb_to_hbb(obbs).numpy()
    c = corners_np(obbs)
    np.testing.assert_allclose(hbb[:, :2], c.min(1), atol=1e-9)
    np.testing.assert_allclose(hbb[:, 2:], c.max(1), atol=1e-9)
    round_trip = obb_to_hbb(hbb_to_obb(hbb)).numpy()
    np.testing.assert_allclose(round_trip, hbb, atol=1e-9)
    assert (hbb_to_obb(hbb)[:, 2] >= hbb_to_obb(hbb)[:, 3]).all()
    np.testing.assert_allclose(box_area(obbs).numpy(), obbs[:, 2] * obbs[:, 3])
    np.testing.assert_allclose(box_area(c.reshape(-1, 8)).numpy(), shapely.area(shapely.polygons(c)), rtol=1e-9)
    np.testing.assert_allclose(box_area(hbb).numpy(), (hbb[:, 2] - hbb[:, 0]) * (hbb[:, 3] - hbb[:, 1]))


def reference_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float) -> list[int]:
    """Plain sequential greedy NMS with shapely IoUs in float64."""
    polys = [shapely.Polygon(p) for p in corners_np(boxes)]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        suppressed = False
        for j in keep:
            if labels[i] != labels[j]:
                continue
            inter = polys[i].intersection(polys[j]).area
            union = polys[i].area + polys[j].area - inter
            if union > 0 and inter / union > thr:
                suppressed = True
                break
        if not suppressed:
            keep.append(i)
    return keep


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
def test_nms_matches_sequential_float64_reference(thr):
    rng = np.random.default_rng(int(thr * 10))
    # clusters of jittered boxes so suppression chains cross the 256-box blocks
    centres = random_obbs(rng, 40, span=300)
    boxes = np.repeat(centres, 15, 0) + rng.normal(0, 1, (600, 5)) * [3, 3, 2, 2, 0.2]
    boxes[:, 2:4] = np.abs(boxes[:, 2:4]) + 1
    scores = rng.uniform(0, 1, 600)
    labels = rng.integers(0, 3, 600)
    keep = rotated_nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), thr)
    assert keep.dtype == torch.int64
    boxes32 = boxes.astype(np.float32).astype(np.float64)  # what the float32 call actually saw
    assert keep.tolist() == reference_nms(boxes32, scores.astype(np.float32), np.zeros(600), thr)
    batched = batched_rotated_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), thr)
    assert batched.tolist() == reference_nms(boxes, scores, labels, thr)
    assert len(batched) > len(keep)


def test_nms_edge_cases():
    assert rotated_nms(torch.zeros(0, 5), torch.zeros(0), 0.5).tolist() == []
    same = torch.tensor([[5.0, 5, 4, 2, 0.3]] * 3)
    assert rotated_nms(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    with pytest.raises(ValueError, match="scores must have shape"):
        rotated_nms(same, torch.zeros(2), 0.5)


def test_hbb_iou_matches_shapely_boxes():
    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 50, (40, 2))
    a = np.concatenate([xy, xy + rng.uniform(0, 30, (40, 2))], 1)
    xy = rng.uniform(0, 50, (30, 2))
    b = np.concatenate([xy, xy + rng.uniform(0, 30, (30, 2))], 1)
    pa, pb = shapely.box(*a.T), shapely.box(*b.T)
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None, :]))
    ref = inter / (shapely.area(pa)[:, None] + shapely.area(pb)[None, :] - inter)
    np.testing.assert_allclose(hbb_iou(a, torch.from_numpy(b)).numpy(), ref, atol=1e-12)
    # and the oriented IoU of the same boxes agrees
    np.testing.assert_allclose(rotated_iou(hbb_to_obb(a), hbb_to_obb(b)).numpy(), ref, atol=1e-9)
