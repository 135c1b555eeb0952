"""FCOS head, horizontal-box RetinaNet and the angle-classification branch.

The FCOS assignment is checked against a brute-force reference built with
shapely (containment and point-to-side distances), not with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from shapely.geometry import LineString, Point, Polygon

from rkd.errors import SpecError
from rkd.geometry import obb_to_poly
from rkd.models import build_detector, validate_model_spec
from rkd.models.angle_cls import angle_from_bins, csl_targets
from rkd.models.fcos import level_ranges
from rkd.outputs import DetectorOutput, Targets

SMALL = {"backbone": {"width": 0.25}, "neck": {"channels": 16}, "head": {"convs": 1}}


def corners(boxes: torch.Tensor) -> torch.Tensor:
    pts = obb_to_poly(boxes).view(-1, 4, 2)
    key = pts[..., 0] * 1e4 + pts[..., 1]
    return torch.gather(pts, 1, key.argsort(dim=1)[..., None].expand(-1, -1, 2))


# ----------------------------------------------------------------------------- FCOS


def test_fcos_outputs_and_info():
    det = build_detector({**SMALL, "kind": "fcos", "head": {"convs": 1, "angle_bins": 12}}, num_classes=2).eval()
    info = det.info
    assert info.num_anchors == 1 and info.has_centerness and info.angle_bins == 12 and info.box_dim == 5
    out = det(torch.zeros(2, 3, 64, 96))
    for lvl, s in enumerate(info.strides):
        h, w = 64 // s, 96 // s
        assert out.cls_logits[lvl].shape == (2, 2, h, w)
        assert out.box_regs[lvl].shape == (2, 5, h, w)
        assert out.centerness[lvl].shape == (2, 1, h, w)
        assert out.angle_logits[lvl].shape == (2, 12, h, w)
        pts = out.anchors[lvl]
        assert pts.shape == (h * w, 5) and torch.all(pts[:, 2:] == 0)
        # location (y=1, x=2) is row-major index 1 * w + 2
        assert pts[1 * w + 2, :2].tolist() == [2.5 * s, 1.5 * s]


def reference_fcos_assignment(points, boxes, strides_per_point, ranges_per_point):
    """Brute force: for each point, the smallest GT that contains it with its largest side distance in range."""
    polys = [Polygon(obb_to_poly(b[None].double())[0].view(4, 2).tolist()) for b in boxes]
    matched = []
    for (px, py), (lo, hi) in zip(points.tolist(), ranges_per_point.tolist()):
        best, best_area = -1, math.inf
        for g, poly in enumerate(polys):
            p = Point(px, py)
            if not poly.contains(p):
                continue
            ring = list(poly.exterior.coords)
            largest = max(LineString([ring[i], ring[i + 1]]).distance(p) for i in range(4))
            if lo < largest <= hi and poly.area < best_area:
                best, best_area = g, poly.area
        matched.append(best)
    return torch.tensor(matched)


def test_fcos_assignment_matches_brute_force():
    det = build_detector({**SMALL, "kind": "fcos"}, num_classes=3).eval()
    head = det.head
    out = det(torch.zeros(1, 3, 128, 128))
    points = out.flat_anchors()[:, :2]
    sizes = out.level_sizes()
    level = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    ranges = torch.tensor(level_ranges(det.info.strides))
    boxes = torch.tensor(
        [
            [60.0, 64.0, 90.0, 40.0, 0.3],  # large, rotated
            [52.0, 60.0, 20.0, 12.0, -0.9],  # small, inside the large one: its points prefer it
            [100.0, 20.0, 150.0, 30.0, 0.0],  # long: its largest side distance puts it on coarser levels
            [10.0, 110.0, 3.0, 2.0, 1.0],  # tiny: contains no point
        ]
    )
    matched, fallback = head.assign(points, level, ranges, boxes)
    ref = reference_fcos_assignment(points, boxes, None, ranges[level])
    tiny_point = fallback.nonzero(as_tuple=True)[0]
    assert tiny_point.numel() == 1 and matched[tiny_point] == 3
    # the fallback point is the stride-8 point nearest the tiny box's centre: (12, 108)
    assert points[tiny_point[0]].tolist() == [12.0, 108.0]
    ref[tiny_point] = 3
    assert torch.equal(matched, ref)
    assert (matched == 1).sum() > 0 and (matched == 2).sum() > 0 and (level[matched == 2] > 0).all()


def test_fcos_box_coding_round_trip_and_hand_values():
    obb_head = build_detector({**SMALL, "kind": "fcos"}, num_classes=2).head
    hbb_head = build_detector({**SMALL, "kind": "fcos", "boxes": "hbb"}, num_classes=2).head
    # horizontal: box [10, 20, 50, 40] seen from (20, 30) at stride 8: l, t, r, b = 10, 10, 30, 10 px
    d = hbb_head.encode_boxes(torch.tensor([[20.0, 30.0]]), torch.tensor([[10.0, 20.0, 50.0, 40.0]]), 8.0)
    assert torch.allclose(d, torch.tensor([[10 / 8, 10 / 8, 30 / 8, 10 / 8]]))
    pts = torch.tensor([[20.0, 30.0]])
    assert torch.allclose(
        hbb_head.decode_boxes(d, torch.cat([pts, pts], 1), 8.0), torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    )
    # oriented, float64, angles across the whole le90 range including its ends
    g = torch.Generator().manual_seed(0)
    n = 500
    w = torch.rand(n, generator=g, dtype=torch.float64) * 60 + 5
    boxes = torch.stack(
        [
            torch.rand(n, generator=g, dtype=torch.float64) * 200,
            torch.rand(n, generator=g, dtype=torch.float64) * 200,
            w,
            w * (torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05),
            torch.rand(n, generator=g, dtype=torch.float64) * math.pi - math.pi / 2,
        ],
        1,
    )
    boxes[:3, 4] = torch.tensor([-math.pi / 2, math.pi / 2 - 1e-9, 0.0], dtype=torch.float64)
    points = boxes[:, :2] + (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 6
    stride = torch.full((n,), 16.0, dtype=torch.float64)
    deltas = obb_head.encode_boxes(points, boxes, stride)
    back = obb_head.decode_boxes(deltas, torch.cat([points, torch.zeros(n, 3, dtype=torch.float64)], 1), 16.0)
    assert torch.allclose(corners(back), corners(boxes), atol=1e-8)
    assert torch.all(back[:, 2] >= back[:, 3])


def test_fcos_losses_and_assignment_fields():
    det = build_detector({**SMALL, "kind": "fcos", "head": {"convs": 1, "angle_bins": 18}}, num_classes=3).train()
    targets = Targets(
        [torch.tensor([[30.0, 30.0, 40.0, 12.0, 0.5], [50.0, 12.0, 4.0, 3.0, 0.0]]), torch.zeros(0, 5)],
        [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)],
        (64, 64),
    )
    out = det(torch.randn(2, 3, 64, 64), targets)
    assert set(out.losses) == {"cls", "box", "centerness", "angle"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    asg = out.assignment
    assert not asg.ignore_mask.any() and torch.equal(asg.neg_mask, ~asg.pos_mask)
    assert not asg.pos_mask[1].any() and (asg.matched_labels[1] == -1).all()
    assert set(asg.matched_labels[0][asg.pos_mask[0]].tolist()) == {1, 2}
    pos = asg.pos_mask[0]
    assert torch.equal(asg.target_boxes[0][pos], targets.boxes[0][asg.matched_gt[0][pos]])
    sum(out.losses.values()).backward()
    assert det.head.centerness_out.weight.grad.abs().sum() > 0 and det.head.angle_out.weight.grad.abs().sum() > 0


def test_fcos_predict_scores_use_centerness():
    det = build_detector({**SMALL, "kind": "fcos"}, num_classes=2).eval()
    out = det(torch.zeros(1, 3, 64, 64))
    cls = [torch.full_like(c, -20.0) for c in out.cls_logits]
    ctr = [torch.full_like(c, -20.0) for c in out.centerness]
    box = [torch.zeros_like(b) for b in out.box_regs]
    cls[0][0, 1, 3, 5] = 2.0  # stride 8, point (44, 28), class 1
    ctr[0][0, 0, 3, 5] = 0.0  # centerness 0.5
    box[0][0, :4, 3, 5] = torch.tensor([1.0, 0.5, 1.0, 0.5])  # 16 x 8 px box centred on the point
    planted = DetectorOutput(out.info, out.features, cls, box, out.anchors, out.image_size, centerness=ctr)
    from rkd.models import decode

    res = decode(planted, box_decoder=det.head.decode_boxes)[0]
    assert res["labels"].tolist() == [1]
    assert res["scores"].item() == pytest.approx(math.sqrt(0.5 / (1 + math.exp(-2.0))))
    assert torch.allclose(res["boxes"], torch.tensor([[44.0, 28.0, 16.0, 8.0, 0.0]]))


# ----------------------------------------------------------------------------- horizontal RetinaNet


def test_retinanet_hbb_anchors_assignment_and_decode():
    det = build_detector({**SMALL, "boxes": "hbb"}, num_classes=2).eval()
    assert det.info.box_dim == 4
    out = det(torch.zeros(1, 3, 64, 64))
    anchors = out.flat_anchors()
    assert anchors.shape[1] == 4
    # location (0, 0) of stride 8: ratios 0.5, 1, 2 (h / w) around (4, 4), area 16^2
    first = anchors[:3]
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    assert torch.allclose(w * h, torch.full((3,), 256.0)) and torch.allclose(h / w, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose((first[:, :2] + first[:, 2:]) / 2, torch.tensor([4.0, 4.0]))
    gt = anchors[50:51].clone()
    asg, losses = det.head.loss(det(torch.zeros(1, 3, 64, 64)), Targets([gt], [torch.tensor([1])], (64, 64)))
    assert asg.pos_mask[0, 50] and asg.matched_labels[0, 50] == 1
    assert set(losses) == {"cls", "box"} and all(torch.isfinite(v) for v in losses.values())
    res = det.predict(torch.zeros(1, 3, 64, 64), score_threshold=0.0, max_per_image=5)[0]
    assert res["boxes"].shape == (5, 4) and torch.all(res["boxes"][:, 2:] >= res["boxes"][:, :2])


# ----------------------------------------------------------------------------- angle classification


def test_csl_targets_are_circular_and_peaked():
    bins = 36
    width = math.pi / bins
    centres = -math.pi / 2 + (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    t = csl_targets(centres, bins)
    assert torch.allclose(t.diagonal(), torch.ones(bins, dtype=torch.float64))
    assert torch.equal(t.argmax(dim=1), torch.arange(bins))
    # -pi/2 and +pi/2 are the same orientation: same targets, peaked across the wrap (bins 0 and 35)
    lo, hi = csl_targets(torch.tensor([-math.pi / 2, math.pi / 2], dtype=torch.float64), bins)
    assert torch.allclose(lo, hi) and lo[0] == pytest.approx(lo[-1]) and lo[0] > 0.9
    sigma = 6 / 5  # 6 degrees in 5-degree bins
    assert t[10, 12].item() == pytest.approx(math.exp(-4 / (2 * sigma**2)))
    angles = torch.rand(100, dtype=torch.float64) * math.pi - math.pi / 2
    err = torch.remainder(angle_from_bins(csl_targets(angles, bins)) - angles + math.pi / 2, math.pi) - math.pi / 2
    assert err.abs().max() <= width / 2 + 1e-12


def test_retinanet_angle_branch():
    det = build_detector({**SMALL, "head": {"convs": 1, "angle_bins": 18}}, num_classes=2).train()
    assert det.info.angle_bins == 18
    targets = Targets([torch.tensor([[30.0, 30.0, 30.0, 10.0, 1.2]])], [torch.tensor([0])], (64, 64))
    out = det(torch.randn(1, 3, 64, 64), targets)
    assert [a.shape for a in out.angle_logits] == [(1, 3 * 18, s, s) for s in (8, 4, 2)]
    assert set(out.losses) == {"cls", "box", "angle"} and torch.isfinite(out.losses["angle"])


@pytest.mark.parametrize(
    "spec, path, words",
    [
        ({"kind": "fcos", "head": {"anchor_ratios": [1.0]}}, "head.anchor_ratios", "allowed keys: angle_bins, convs"),
        ({"boxes": "hbb", "head": {"angle_bins": 18}}, "head.angle_bins", "needs boxes: obb"),
        ({"head": {"angle_bins": 1}}, "head.angle_bins", "must be 0"),
        ({"kind": "fcos", "head": {"angle_bins": -2}}, "head.angle_bins", "must be >= 0"),
    ],
)
def test_head_spec_errors(spec, path, words):
    with pytest.raises(SpecError) as err:
        validate_model_spec(spec)
    assert err.value.path == path and words in err.value.message


def test_fcos_spec_defaults():
    spec = validate_model_spec({"kind": "fcos"})
    assert spec["head"] == {"convs": 2, "angle_bins": 0}
