"""Detector layer: output layout, anchors, assignment, box coding, losses, decoding, spec validation.

References are independent of the code under test: shapely polygons for IoU,
hand-derived deltas, float64 corner comparisons.
"""

from __future__ import annotations

import math

import pytest
import torch
from shapely.geometry import Polygon

from rkd.errors import SpecError
from rkd.geometry import normalize_le90, obb_to_poly
from rkd.models import HbbCoder, ObbCoder, build_detector, decode, validate_model_spec
from rkd.models.anchors import assign_max_iou
from rkd.outputs import DetectorOutput, Targets

TINY = {"backbone": {"width": 0.25}, "neck": {"channels": 16}, "head": {"convs": 1}}


@pytest.fixture(scope="module")
def tiny_det():
    torch.manual_seed(0)
    return build_detector(TINY, num_classes=3)


def shapely_iou(a, b) -> float:
    pa = Polygon(obb_to_poly(torch.as_tensor(a, dtype=torch.float64)[None])[0].view(4, 2).tolist())
    pb = Polygon(obb_to_poly(torch.as_tensor(b, dtype=torch.float64)[None])[0].view(4, 2).tolist())
    inter = pa.intersection(pb).area
    return inter / (pa.area + pb.area - inter)


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """Corners of each box as a sorted set (independent of the (w, h, angle) representation)."""
    pts = obb_to_poly(boxes).view(-1, 4, 2)
    key = pts[..., 0] * 1e4 + pts[..., 1]
    return torch.gather(pts, 1, key.argsort(dim=1)[..., None].expand(-1, -1, 2))


# ----------------------------------------------------------------------------- layout


def test_output_shapes_and_flatten_order(tiny_det):
    det = tiny_det.eval()
    images = torch.randn(2, 3, 64, 96)  # non-square: catches H/W mix-ups
    out = det(images)
    info = det.info
    assert out.info == info and info.strides == (8, 16, 32) and info.num_anchors == 3 and info.box_dim == 5
    assert out.image_size == (64, 96) and out.inputs is images
    assert out.assignment is None and out.losses == {}
    a, k = 3, 3
    for lvl, s in enumerate((8, 16, 32)):
        h, w = 64 // s, 96 // s
        assert out.features[lvl].shape == (2, info.level_channels[lvl], h, w)
        assert out.cls_logits[lvl].shape == (2, a * k, h, w)
        assert out.box_regs[lvl].shape == (2, a * 5, h, w)
        assert out.anchors[lvl].shape == (h * w * a, 5)
    # Level 1 (stride 16, 4 x 6 map), location y=2, x=3, anchor 1 (ratio 1: a 32 px square).
    y, x, anc, cls = 2, 3, 1, 2
    idx = out.level_sizes()[0] + (y * 6 + x) * a + anc
    assert out.flat_cls()[1, idx, cls] == out.cls_logits[1][1, anc * k + cls, y, x]
    assert torch.equal(out.flat_box()[1, idx], out.box_regs[1][1, anc * 5 : anc * 5 + 5, y, x])
    assert out.flat_anchors()[idx].tolist() == [(x + 0.5) * 16, (y + 0.5) * 16, 32.0, 32.0, 0.0]
    # head_fn recomputes the head from the features
    cls2, box2 = out.head_fn(out.features)
    assert all(torch.allclose(p, q) for p, q in zip(cls2 + box2, out.cls_logits + out.box_regs))


def test_anchors_are_le90_with_ratio_and_area(tiny_det):
    out = tiny_det.eval()(torch.zeros(1, 3, 64, 64))
    anchors = out.anchors[0][:3]  # first location of stride 8: ratios 0.5, 1, 2 (h / w), base 16 px
    w, h, ang = anchors[:, 2], anchors[:, 3], anchors[:, 4]
    assert torch.all(w >= h)
    assert torch.allclose(w * h, torch.full((3,), 256.0))
    assert ang.tolist() == [0.0, 0.0, pytest.approx(-math.pi / 2)]  # the tall anchor is (h, w, -pi/2) in le90
    assert torch.allclose(w[0] / h[0], torch.tensor(2.0)) and torch.allclose(w[2] / h[2], torch.tensor(2.0))
    assert torch.allclose(anchors[:, :2], torch.tensor([4.0, 4.0]).expand(3, 2))


def test_classification_bias_prior(tiny_det):
    out = tiny_det.eval()(torch.randn(1, 3, 64, 64))
    prob = torch.sigmoid(torch.cat([c.flatten() for c in out.cls_logits]))
    assert abs(prob.mean().item() - 0.01) < 0.003


# ----------------------------------------------------------------------------- assignment


def test_assignment_matches_shapely_reference(tiny_det):
    out = tiny_det.eval()(torch.zeros(1, 3, 64, 64))
    anchors = out.flat_anchors()
    gts = torch.stack(
        [
            anchors[100].clone(),  # exactly an anchor
            torch.tensor([40.0, 22.0, 30.0, 9.0, 0.7]),  # rotated, mid-size
            torch.tensor([13.0, 50.0, 3.0, 2.0, -1.2]),  # tiny: below 0.4 with every anchor
        ]
    )
    labels = torch.tensor([2, 0, 1])
    targets = Targets([gts], [labels], (64, 64))
    asg = tiny_det.head.loss(tiny_det.eval()(torch.zeros(1, 3, 64, 64)), targets)[0]
    pos, neg, ign = asg.pos_mask[0], asg.neg_mask[0], asg.ignore_mask[0]
    assert not (pos & neg).any() and not (pos & ign).any() and not (neg & ign).any()
    assert (pos | neg | ign).all()

    ref = torch.tensor([[shapely_iou(g, an) for an in anchors.double()] for g in gts.double()])  # (3, N)
    best, best_gt = ref.max(dim=0)
    forced = ref.argmax(dim=1)
    exp_pos = best >= 0.5
    exp_pos[forced] = True
    exp_neg = (best < 0.4) & ~exp_pos
    assert torch.equal(pos, exp_pos) and torch.equal(neg, exp_neg)
    exp_gt = torch.where(exp_pos, best_gt, -1)
    exp_gt[forced] = torch.arange(3)
    assert torch.equal(asg.matched_gt[0], exp_gt)
    assert torch.equal(asg.matched_labels[0], torch.where(exp_pos, labels[exp_gt.clamp(min=0)], -1))
    # The GT equal to anchor 100: positive with its label and box; the tiny GT got exactly one anchor.
    assert pos[100] and asg.matched_labels[0, 100] == 2 and torch.equal(asg.target_boxes[0, 100], gts[0])
    assert (asg.matched_gt[0] == 2).sum() == 1 and ref[2].max() < 0.4
    assert torch.all(asg.target_boxes[0][~pos] == 0)


def test_assignment_empty_image_is_all_negative():
    anchors = torch.tensor([[10.0, 10.0, 8.0, 8.0, 0.0], [30.0, 10.0, 8.0, 4.0, 0.0]])
    pos, neg, ign, matched, labels = assign_max_iou(anchors, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert neg.all() and not pos.any() and not ign.any()
    assert matched.tolist() == [-1, -1] and labels.tolist() == [-1, -1]


# ----------------------------------------------------------------------------- box coding


def test_obb_encode_hand_values():
    coder = ObbCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 5.0, 0.0]], dtype=torch.float64)
    d = coder.encode(torch.tensor([[3.0, 4.0, 20.0, 5.0, 0.0]], dtype=torch.float64), anchor)
    assert torch.allclose(d, torch.tensor([[0.3, 0.8, math.log(2), 0.0, 0.0]], dtype=torch.float64))
    # A near-vertical box next to a horizontal anchor is encoded with swapped sides and a small angle.
    d = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 5.0, -math.pi / 2 + 0.1]], dtype=torch.float64), anchor)
    assert torch.allclose(d, torch.tensor([[0.0, 0.0, math.log(0.5), math.log(2.0), 0.1]], dtype=torch.float64))
    # Offsets are measured in the anchor's frame: anchor turned by +90 degrees.
    rot = torch.tensor([[0.0, 0.0, 10.0, 5.0, math.pi / 2 - 1e-12]], dtype=torch.float64)
    d = coder.encode(torch.tensor([[0.0, 10.0, 10.0, 5.0, math.pi / 2 - 1e-12]], dtype=torch.float64), rot)
    assert torch.allclose(d[0, :2], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-9)


def test_obb_coder_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    n = 2000
    w = torch.rand(n, generator=g, dtype=torch.float64) * 80 + 4
    h = w * (torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * math.pi - math.pi / 2
    ang[:6] = torch.tensor([-math.pi / 2, -math.pi / 2 + 1e-9, math.pi / 2 - 1e-9, math.pi / 4, -math.pi / 4, 0.0])
    boxes = torch.stack(
        [
            torch.rand(n, generator=g, dtype=torch.float64) * 500,
            torch.rand(n, generator=g, dtype=torch.float64) * 500,
            w,
            h,
            ang,
        ],
        1,
    )
    aw = torch.rand(n, generator=g, dtype=torch.float64) * 60 + 8
    anchors = torch.stack(
        [
            boxes[:, 0] + 5,
            boxes[:, 1] - 7,
            aw,
            aw / 2,
            torch.where(torch.arange(n) % 2 == 0, 0.0, -math.pi / 2).double(),
        ],
        1,
    )
    coder = ObbCoder()
    deltas = coder.encode(boxes, anchors)
    assert deltas[:, 4].abs().max() <= math.pi / 4 + 1e-12
    back = coder.decode(deltas, anchors)
    assert torch.all(back[:, 2] >= back[:, 3])
    assert torch.all(back[:, 4] >= -math.pi / 2) and torch.all(back[:, 4] < math.pi / 2)
    assert torch.allclose(corners(back), corners(boxes), atol=1e-8)
    assert torch.allclose(back[:, :4], normalize_le90(boxes)[:, :4], atol=1e-9)


def test_hbb_coder_round_trip_float64():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(100, 2, generator=g, dtype=torch.float64) * 100
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g, dtype=torch.float64) * 50 + 1], 1)
    anchors = torch.cat([xy + 3, xy + 40], 1)
    coder = HbbCoder()
    d = coder.encode(boxes, anchors)
    assert torch.allclose(coder.decode(d, anchors), boxes, atol=1e-10)
    # hand value: anchor [0,0,10,10], box [5,0,15,20]: centre moves (5, 5), size (1x, 2x)
    d = coder.encode(torch.tensor([[5.0, 0, 15, 20]]), torch.tensor([[0.0, 0, 10, 10]]))
    assert torch.allclose(d, torch.tensor([[0.5, 0.5, 0.0, math.log(2)]]))


# ----------------------------------------------------------------------------- losses


def test_losses_finite_and_differentiable(tiny_det):
    det = tiny_det.train()
    images = torch.randn(2, 3, 64, 64)
    targets = Targets(
        [torch.tensor([[20.0, 30.0, 24.0, 10.0, 0.4], [50.0, 12.0, 12.0, 11.0, -1.3]]), torch.zeros(0, 5)],
        [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)],
        (64, 64),
    )
    out = det(images, targets)
    assert set(out.losses) == {"cls", "box"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    assert out.assignment.pos_mask[1].sum() == 0 and out.assignment.pos_mask[0].sum() >= 2
    assert out.assignment.target_boxes.shape == (2, out.flat_anchors().shape[0], 5)
    sum(out.losses.values()).backward()
    assert det.head.box_out.weight.grad.abs().sum() > 0 and det.backbone.stages[0][0].weight.grad.abs().sum() > 0
    det.zero_grad()


def test_box_loss_is_zero_for_perfect_deltas():
    torch.manual_seed(0)
    det = build_detector(TINY, num_classes=2).eval()
    gt = torch.tensor([[30.0, 33.0, 26.0, 9.0, 0.6]])
    targets = Targets([gt], [torch.tensor([1])], (64, 64))
    out = det(torch.randn(1, 3, 64, 64), targets)
    assert out.losses["box"] > 0
    # Overwrite the regression maps with the exact encoded targets at the positives.
    flat = out.flat_box().detach().clone()
    pos = out.assignment.pos_mask
    flat[pos] = ObbCoder().encode(out.assignment.target_boxes[pos], out.flat_anchors()[pos[0]])
    from rkd.outputs import unflatten_levels

    out.box_regs = unflatten_levels(flat, out.box_regs, 3)
    _, losses = det.head.loss(out, targets)
    assert losses["box"].item() < 1e-10


# ----------------------------------------------------------------------------- decoding


def test_decode_recovers_a_planted_detection(tiny_det):
    out = tiny_det.eval()(torch.zeros(1, 3, 64, 64))
    cls = [torch.full_like(c, -10.0) for c in out.cls_logits]
    box = [torch.zeros_like(b) for b in out.box_regs]
    # level 1 (4 x 4), y=1, x=2, anchor 2 (tall), class 1: logit 3; its deltas shift dx by 0.25
    a, k = 3, 3
    cls[1][0, 2 * k + 1, 1, 2] = 3.0
    box[1][0, 2 * 5 + 0, 1, 2] = 0.25
    planted = DetectorOutput(out.info, out.features, cls, box, out.anchors, out.image_size)
    det = decode(planted, score_threshold=0.05)[0]
    assert det["labels"].tolist() == [1]
    assert det["scores"].item() == pytest.approx(1 / (1 + math.exp(-3.0)))
    anchor = out.anchors[1][(1 * 4 + 2) * a + 2]  # (cx, cy, long, short, -pi/2): w-axis points along -y
    expected = anchor.clone()
    expected[1] -= 0.25 * anchor[2]
    assert torch.allclose(corners(det["boxes"]), corners(expected[None]), atol=1e-4)


def test_predict_format_and_limits(tiny_det):
    det = tiny_det.train()
    with torch.no_grad():
        det.head.cls_out.bias.fill_(2.0)  # every anchor scores ~0.88: NMS and the caps must act
    try:
        res = det.predict(torch.randn(2, 3, 64, 64), max_per_image=7, nms_iou=0.5)
    finally:
        with torch.no_grad():
            det.head.cls_out.bias.fill_(-math.log(99))
    assert det.training  # restored
    assert len(res) == 2
    for r in res:
        assert r["boxes"].shape == (7, 5) and r["scores"].shape == (7,) and r["labels"].shape == (7,)
        assert torch.all(r["scores"][:-1] >= r["scores"][1:])
        assert torch.all(r["boxes"][:, 2] >= r["boxes"][:, 3])
        assert torch.all(r["boxes"][:, 4] >= -math.pi / 2) and torch.all(r["boxes"][:, 4] < math.pi / 2)


# ----------------------------------------------------------------------------- spec


def test_validate_fills_defaults_and_is_idempotent():
    spec = validate_model_spec({})
    assert spec == {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {
            "name": "convnet",
            "width": 1.0,
            "depth": 1,
            "pretrained": False,
            "out_indices": [2, 3, 4],
            "weights": None,
        },
        "neck": {"channels": 64, "levels": 3},
        "head": {
            "convs": 2,
            "anchor_ratios": [0.5, 1.0, 2.0],
            "anchor_scales": [1.0],
            "anchor_size": 2.0,
            "angle_bins": 0,
        },
    }
    assert validate_model_spec(spec) == spec
    assert validate_model_spec({"backbone": {"width": 2}})["backbone"]["width"] == 2.0


@pytest.mark.parametrize(
    "spec, path, words",
    [
        ({"backbone": {"width": -1}}, "backbone.width", "must be > 0, got -1"),
        ({"backbone": {"width": "wide"}}, "backbone.width", "expected a number"),
        ({"backbone": {"depth": 0}}, "backbone.depth", "must be >= 1"),
        ({"backbone": {"depth": 1.5}}, "backbone.depth", "expected an integer"),
        ({"backbone": {"name": "vgg99"}}, "backbone.name", "known: convnet"),
        (
            {"backbone": {"widht": 1.0}},
            "backbone.widht",
            "allowed keys: depth, name, out_indices, pretrained, weights, width",
        ),
        ({"backbone": {"pretrained": True}}, "backbone.pretrained", "no pretrained weights"),
        ({"backbone": {"pretrained": "yes"}}, "backbone.pretrained", "expected true or false"),
        ({"backbone": [1]}, "backbone", "expected a mapping"),
        ({"neck": {"chanels": 32}}, "neck.chanels", "allowed keys: channels, levels"),
        ({"neck": {"channels": "64"}}, "neck.channels", "expected an integer, got '64' (str)"),
        ({"neck": {"levels": 6}}, "neck.levels", "must be <= 5"),
        ({"head": {"convs": -1}}, "head.convs", "must be >= 0"),
        ({"head": {"anchor_ratios": []}}, "head.anchor_ratios", "non-empty list"),
        ({"head": {"anchor_ratios": [1.0, -2]}}, "head.anchor_ratios.1", "must be > 0"),
        ({"head": {"anchor_scales": 1.0}}, "head.anchor_scales", "non-empty list"),
        ({"kind": "yolo"}, "kind", "expected one of retinanet"),
        ({"boxes": "rbox"}, "boxes", "expected one of obb, hbb"),
        ({"backbone": {}, "extra": 1}, "extra", "unknown key"),
    ],
)
def test_validate_errors_name_the_path(spec, path, words):
    with pytest.raises(SpecError) as err:
        validate_model_spec(spec)
    assert err.value.path == path
    assert words in err.value.message
    assert str(err.value).startswith(f"{path}: ")
    assert err.value.within("teacher.model").path == f"teacher.model.{path}"


def test_build_detector_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_detector({}, num_classes=0)


def test_backbone_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    a = build_detector(TINY, num_classes=2)
    path = tmp_path / "bb.pt"
    torch.save(a.backbone.state_dict(), path)
    b = build_detector({**TINY, "backbone": {"width": 0.25, "weights": str(path)}}, num_classes=2)
    for (ka, va), (kb, vb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(SpecError, match="backbone.weights: .* does not fit"):
        build_detector({**TINY, "backbone": {"width": 0.5, "weights": str(path)}}, num_classes=2)
    with pytest.raises(SpecError, match="backbone.weights: cannot load"):
        build_detector({**TINY, "backbone": {"width": 0.25, "weights": str(tmp_path / "missing.pt")}}, num_classes=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_forward_loss_predict_on_cuda(kind):
    det = build_detector({**TINY, "kind": kind}, num_classes=3).cuda()
    targets = Targets([torch.tensor([[30.0, 30.0, 24.0, 10.0, 0.4]])], [torch.tensor([1])], (64, 64)).to("cuda")
    out = det(torch.randn(1, 3, 64, 64, device="cuda"), targets)
    assert all(a.is_cuda for a in out.anchors) and out.assignment.pos_mask.is_cuda
    sum(out.losses.values()).backward()
    res = det.predict(torch.randn(1, 3, 64, 64, device="cuda"), score_threshold=0.0, max_per_image=4)[0]
    assert res["boxes"].is_cuda and res["boxes"].shape == (4, 5)
