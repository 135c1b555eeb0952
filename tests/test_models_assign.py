"""RetinaNet anchor assignment rule ``head.assign``: ``rotated`` (exact rotated IoU) or ``hbb``
(axis-aligned IoU of the anchors with the GT's circumscribed horizontal box).

References are independent of the code under test: shapely polygons (float64) for both IoUs.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from shapely.geometry import Polygon, box

from rkd.errors import SpecError
from rkd.geometry import obb_to_poly
from rkd.models import build_detector, validate_model_spec
from rkd.models.anchors import anchor_sizes, assign_max_iou, grid_anchors, pairwise_iou
from rkd.outputs import Targets
from rkd.train.checkpoint import load_detector, save_detector

TINY = {"backbone": {"width": 0.25}, "neck": {"channels": 16}, "head": {"convs": 1}}


def polygon(b) -> Polygon:
    return Polygon(obb_to_poly(torch.as_tensor(b, dtype=torch.float64)[None])[0].view(4, 2).tolist())


def iou(pa: Polygon, pb: Polygon) -> float:
    inter = pa.intersection(pb).area
    return inter / (pa.area + pb.area - inter)


def shapely_ious(gts: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rotated, hbb)`` IoU matrices (G, N): polygons, and the polygons' axis-aligned bounds."""
    rot, hbb = [], []
    for g in gts.double():
        pg = polygon(g)
        hg = box(*pg.bounds)
        pas = [polygon(a) for a in anchors.double()]
        rot.append([iou(pg, pa) for pa in pas])
        hbb.append([iou(hg, box(*pa.bounds)) for pa in pas])
    return torch.tensor(rot, dtype=torch.float64), torch.tensor(hbb, dtype=torch.float64)


def default_anchors(size: int = 128) -> torch.Tensor:
    """The default RetinaNet anchors (strides 8, 16, 32) of a ``size`` x ``size`` image, float64."""
    h = validate_model_spec({})["head"]
    sizes = {s: anchor_sizes(h["anchor_size"] * s, h["anchor_ratios"], h["anchor_scales"]) for s in (8, 16, 32)}
    return torch.cat([grid_anchors(size // s, size // s, s, sizes[s], 5) for s in sizes]).double()


def random_obbs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) * 60 + 4
    h = w * (torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.1)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * math.pi - math.pi / 2
    ang[:4] = torch.tensor([-math.pi / 2, 0.0, math.pi / 4, -math.pi / 4], dtype=torch.float64)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 120 + 4
    return torch.cat([xy, w[:, None], h[:, None], ang[:, None]], 1)


# ----------------------------------------------------------------------------- hbb IoU


def test_hbb_iou_matches_shapely_bounds_float64():
    gts = random_obbs(40, seed=0)
    anchors = torch.cat([default_anchors(64), random_obbs(30, seed=1)])  # axis-aligned anchors and rotated boxes
    _, ref = shapely_ious(gts, anchors)
    got = pairwise_iou(gts, anchors, "hbb")
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert (ref > 0).sum() > 100  # the sample has real overlaps, not only zeros
    assert torch.allclose(got, ref, atol=1e-9, rtol=0)


def test_rotated_mode_is_the_exact_rotated_iou():
    gts, anchors = random_obbs(10, seed=2), default_anchors(64)
    ref, _ = shapely_ious(gts, anchors)
    assert torch.allclose(pairwise_iou(gts, anchors), ref, atol=1e-6, rtol=0)
    assert torch.equal(pairwise_iou(gts, anchors, "rotated"), pairwise_iou(gts, anchors))


def test_unknown_assign_rule_is_refused():
    with pytest.raises(ValueError, match="assign must be one of rotated, hbb"):
        pairwise_iou(random_obbs(4, seed=0), default_anchors(32), "circle")


# ----------------------------------------------------------------------------- thin rotated objects


def head_assignment(assign: str | None, gts: torch.Tensor, size: int = 128):
    spec = {**TINY, "head": {**TINY["head"], **({"assign": assign} if assign else {})}}
    torch.manual_seed(0)
    det = build_detector(spec, num_classes=1).eval()
    out = det(torch.zeros(1, 3, size, size))
    targets = Targets([gts.float()], [torch.zeros(gts.shape[0], dtype=torch.long)], (size, size))
    return det.head.loss(out, targets)[0], out.flat_anchors()


def test_thin_45_degree_car_gets_more_positives_with_hbb():
    # A car (40 x 16 px) at 45 degrees, centred on a stride-8 anchor between stride-16 anchors.
    car = torch.tensor([[68.0, 68.0, 40.0, 16.0, math.pi / 4]], dtype=torch.float64)
    rot_asg, anchors = head_assignment(None, car)
    hbb_asg, _ = head_assignment("hbb", car)
    ref_rot, ref_hbb = shapely_ious(car, anchors)
    # rotated: no anchor reaches 0.5; the car is positive only at the anchor it claims.
    assert ref_rot.max() < 0.5
    assert rot_asg.pos_mask[0].sum() == 1
    assert rot_asg.pos_mask[0].nonzero().flatten().tolist() == [int(ref_rot.argmax())]
    # hbb: the three anchors whose horizontal IoU with the car's circumscribed box is >= 0.5.
    exp_hbb = ref_hbb[0] >= 0.5
    assert exp_hbb.sum() == 3
    assert torch.equal(hbb_asg.pos_mask[0], exp_hbb)
    assert torch.equal(hbb_asg.neg_mask[0], ref_hbb[0] < 0.4)
    # Only which anchors are positive changes: the regression target is still the rotated GT box.
    assert torch.equal(hbb_asg.target_boxes[0][exp_hbb], car.float().expand(3, 5))
    assert torch.equal(hbb_asg.matched_labels[0][exp_hbb], torch.zeros(3, dtype=torch.long))


def test_hbb_gives_thin_rotated_boxes_more_positives_over_positions():
    # 40 x 16 boxes at 45 degrees on every 2-px offset of one stride-16 cell: many at once (G = 64).
    off = torch.arange(0.0, 16.0, 2.0, dtype=torch.float64)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    cars = torch.stack([56 + ox.flatten(), 56 + oy.flatten()], 1)
    cars = torch.cat([cars, torch.tensor([40.0, 16.0, math.pi / 4]).double().expand(64, 3)], 1)
    anchors = default_anchors(128)
    per_gt = {}
    for rule in ("rotated", "hbb"):
        counts = []
        for car in cars:  # one GT per image: each car's own positives
            pos = assign_max_iou(anchors.float(), car[None].float(), torch.zeros(1, dtype=torch.long), assign=rule)[0]
            counts.append(int(pos.sum()))
        per_gt[rule] = torch.tensor(counts)
    assert (per_gt["rotated"] >= 1).all() and (per_gt["hbb"] >= 1).all()  # each GT still claims its best anchor
    assert per_gt["hbb"].float().mean() > 2 * per_gt["rotated"].float().mean()
    assert (per_gt["rotated"] == 1).float().mean() > 0.5  # most positions: only the claimed anchor


def test_no_assign_key_gives_the_rotated_assignment():
    gts = torch.tensor([[40.0, 22.0, 30.0, 9.0, 0.7], [90.0, 70.0, 40.0, 16.0, -math.pi / 4]], dtype=torch.float64)
    plain, anchors = head_assignment(None, gts)
    explicit, _ = head_assignment("rotated", gts)
    ref_rot, _ = shapely_ious(gts, anchors)
    for field in dataclasses.fields(plain):
        assert torch.equal(getattr(plain, field.name), getattr(explicit, field.name))
    best = ref_rot.max(dim=0).values
    claimed = ref_rot.argmax(dim=1)
    exp_pos = best >= 0.5
    exp_pos[claimed] = True
    assert torch.equal(plain.pos_mask[0], exp_pos)


# ----------------------------------------------------------------------------- spec


def test_spec_without_assign_is_unchanged_and_hbb_is_kept():
    plain = validate_model_spec({})
    assert "assign" not in plain["head"]  # specs (and so teacher cache hashes) without the key stay as they were
    assert validate_model_spec({"head": {"assign": "rotated"}}) == plain
    hbb = validate_model_spec({"head": {"assign": "hbb"}})
    assert hbb["head"]["assign"] == "hbb" and validate_model_spec(hbb) == hbb
    assert {k: v for k, v in hbb["head"].items() if k != "assign"} == plain["head"]
    assert build_detector({"head": {"assign": "hbb"}}, 2).head.assign_rule == "hbb"
    assert build_detector({}, 2).head.assign_rule == "rotated"


@pytest.mark.parametrize(
    "spec, path, words",
    [
        ({"head": {"assign": "circle"}}, "head.assign", "expected one of rotated, hbb, got 'circle' (str)"),
        ({"head": {"assign": 1}}, "head.assign", "expected one of rotated, hbb, got 1 (int)"),
        ({"head": {"assign": "hbb"}, "boxes": "hbb"}, "head.assign", "needs boxes: obb"),
        ({"kind": "fcos", "head": {"assign": "hbb"}}, "head.assign", "unknown key"),
        ({"kind": "faster_rcnn", "boxes": "hbb", "head": {"assign": "hbb"}}, "head.assign", "unknown key"),
    ],
)
def test_spec_assign_errors(spec, path, words):
    with pytest.raises(SpecError) as exc:
        validate_model_spec(spec)
    assert exc.value.path == path and words in str(exc.value)


def test_checkpoints_with_and_without_assign_load(tmp_path):
    for head in ({}, {"assign": "hbb"}):
        spec = validate_model_spec({**TINY, "head": {**TINY["head"], **head}})
        det = build_detector(spec, num_classes=2)
        save_detector(tmp_path / "m.pt", det, spec, ["car", "plane"], 64)
        loaded, ckpt = load_detector(tmp_path / "m.pt")
        assert ckpt["model_spec"] == spec and loaded.head.assign_rule == head.get("assign", "rotated")
        assert all(torch.equal(a, b) for a, b in zip(det.state_dict().values(), loaded.state_dict().values()))
