"""NSD and the shared GT masks: float64 references, goldens, gradients, refusals.

Regenerate the NSD goldens with ``python tests/test_distill_nsd.py --regen``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import (
    conv3x3_np,
    corners,
    flat_np,
    make_info,
    make_output,
    make_targets,
    np64,
    set_conv_weights,
    touches_cell,
)
from shapely.geometry import Point, Polygon

from rkd.distill import build_distiller, validate_methods
from rkd.distill.masks import foreground_masks, points_in_boxes
from rkd.errors import SpecError
from rkd.outputs import Targets

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
GOLDEN = Path(__file__).parent / "fixtures" / "kd_golden_core.json"
BINS = 12


# ----------------------------------------------------------------------------- references


def ref_fg_masks(targets: Targets, out) -> list[np.ndarray]:
    """Foreground of each location's cell (side s, centre ((x + 1/2) s, (y + 1/2) s)) by shapely polygons."""
    masks = []
    for f, s in zip(out.features, out.info.strides):
        b, _, h, w = f.shape
        m = np.zeros((b, 1, h, w))
        for i in range(b):
            polys = [Polygon(corners(bx)) for bx in targets.boxes[i].tolist()]
            for y in range(h):
                for x in range(w):
                    m[i, 0, y, x] = float(any(touches_cell(poly, x, y, s) for poly in polys))
        masks.append(m)
    return masks


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_nsd(student, teacher, targets, hp: dict, adapters, epoch: float) -> dict[str, float]:
    out: dict[str, float] = {}
    if hp["pixel"]:
        fgs = ref_fg_masks(targets, student)
        total = 0.0
        for conv, fs, ft, m in zip(adapters, student.features, teacher.features, fgs):
            d2 = (conv3x3_np(np64(fs), np64(conv.weight), np64(conv.bias)) - np64(ft)) ** 2
            c = d2.shape[1]  # the released code's mask is repeated over channels: a per-element mean
            l_fg = (d2 * m).sum() / max(1.0, 2 * c * m.sum())
            l_bg = (d2 * (1 - m)).sum() / max(1.0, 2 * c * (1 - m).sum())
            total += hp["fg_weight"] * l_fg + hp["bg_weight"] * l_bg
        out["pixel"] = total / len(fgs)
    a = student.info.num_anchors
    zs, zt = flat_np(student.cls_logits, a), flat_np(teacher.cls_logits, a)
    neg = student.assignment.neg_mask.numpy()
    score = (1 / (1 + np.exp(-zt))).max(-1)
    sel = np.zeros_like(neg)
    for i in range(neg.shape[0]):
        idx = np.nonzero(neg[i])[0]
        if hp["ncs"] == "all":
            sel[i, idx] = True
        elif hp["ncs"] == "threshold":
            sel[i, idx[score[i, idx] > hp["threshold"]]] = True
        else:
            order = idx[np.argsort(-score[i, idx], kind="stable")][: hp["k"]]
            sel[i, order] = True
    n = max(1, int(sel.sum()))
    t, beta = hp["temperature"], hp["beta"]
    if hp["logit"]:
        if hp["logit_form"] == "softmax":
            p, q = softmax_np(zt[sel] / t), softmax_np(zs[sel] / t)
            kl = (p * (np.log(p) - np.log(q))).sum()
        else:
            p, q = 1 / (1 + np.exp(-zt[sel] / t)), 1 / (1 + np.exp(-zs[sel] / t))
            kl = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum()
        warm = min(epoch / hp["warmup_epochs"], 1.0) if hp["warmup_epochs"] else 1.0
        out["logit"] = hp["logit_weight"] * warm * beta * t * t * kl / n
    if hp["box"]:
        bs, bt = flat_np(student.box_regs, a)[sel], flat_np(teacher.box_regs, a)[sel]
        out["box"] = hp["box_weight"] * np.abs(bs - bt).sum() / (n * bs.shape[-1])
    if hp["angle"]:
        a_s, a_t = flat_np(student.angle_logits, a)[sel], flat_np(teacher.angle_logits, a)[sel]
        zt_sel = zt[sel]
        bins = a_t.shape[-1]
        p = softmax_np(a_t / t)
        if hp["csl_sigma"] > 0:
            g = np.array(
                [
                    [
                        math.exp(-(min(abs(i - j), bins - abs(i - j)) ** 2) / (2 * hp["csl_sigma"] ** 2))
                        for j in range(bins)
                    ]
                    for i in range(bins)
                ]
            )
            g /= g.sum(1, keepdims=True)
            p = np.array([[sum(g[j, i] * row[i] for i in range(bins)) for j in range(bins)] for row in p])
        cls = zt_sel.argmax(-1)
        sc = (1 / (1 + np.exp(-zt_sel))).max(-1)
        priors = {}
        for c in set(cls.tolist()):
            w = sc[cls == c]
            priors[c] = (w[:, None] * p[cls == c]).sum(0) / w.sum()
        lam = hp["ce_mix"]
        total = 0.0
        for i in range(p.shape[0]):
            qi = (1 - lam) * p[i] + lam * priors[int(cls[i])] if lam > 0 else p[i]
            j = int(np.argmax(qi))
            qh = np.delete(qi, j)
            qh = qh / qh.sum()
            sh = softmax_np(np.delete(a_s[i] / t, j))
            total += (qh * (np.log(qh) - np.log(sh))).sum()
        out["angle"] = hp["angle_weight"] * beta * t * t * total / n
    return out


# ----------------------------------------------------------------------------- cases


def infos():
    s_info = make_info(channels=(6, 10), num_anchors=2, angle_bins=BINS)
    t_info = make_info(channels=(12, 8), num_anchors=2, angle_bins=BINS)
    return s_info, t_info


# The two parts rkd's defaults switch off: with them the released configuration's four parts.
FOUR = {"pixel": True, "box": True}
CASES = {
    "nsd_default": {},
    "nsd_four_parts": {**FOUR, "ncs": "topk"},
    "nsd_topk": {**FOUR, "ncs": "topk", "k": 10, "fg_weight": 2.0, "csl_sigma": 0.0},
    "nsd_threshold": {
        **FOUR,
        "ncs": "threshold",
        "threshold": 0.6,
        "ce_mix": 0.0,
        "temperature": 2.0,
        "beta": 4.0,
        "logit_form": "softmax",
    },
    "nsd_all": {**FOUR, "ncs": "all", "bg_weight": 3.0},
    "nsd_box_angle": {"box": True, "logit": False, "ce_mix": 1.0, "csl_sigma": 2.0},
}


def case(name: str, epoch: float = 5.0):
    s_info, t_info = infos()
    s = make_output(s_info, gen=torch.Generator().manual_seed(21))
    t = make_output(t_info, gen=torch.Generator().manual_seed(22))
    tg = make_targets()
    cfg = {"nsd": CASES[name]}
    d = build_distiller(cfg, s_info, t_info)
    comp = d.components["nsd"]
    if comp.hparams["pixel"]:
        set_conv_weights(comp, 31)
        comp.adapter_scale.done.fill_(True)  # the formula with these weights (the scale init: test_distill_adapters)
    hp = validate_methods(cfg)["nsd"]
    ref = ref_nsd(s, t, tg, hp, getattr(comp, "adapters", None), epoch)
    return d, s, t, tg, ref


# ----------------------------------------------------------------------------- tests


def test_points_in_rotated_boxes_match_shapely():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.cat(
        [
            torch.rand(7, 2, generator=gen) * 50,
            5 + torch.rand(7, 2, generator=gen) * 20,
            (torch.rand(7, 1, generator=gen) - 0.5) * math.pi,
        ],
        -1,
    )
    pts = torch.rand(400, 2, generator=gen) * 60
    got = points_in_boxes(pts, boxes).numpy()
    polys = [Polygon(corners(b)) for b in boxes.tolist()]
    want = np.array([[poly.covers(Point(*p)) for poly in polys] for p in pts.tolist()])
    assert got.shape == (400, 7)
    assert (got == want).all()
    assert want.sum() > 20  # the case is not trivially empty


def test_foreground_masks_match_shapely_and_use_anchor_centres():
    s_info, _ = infos()
    s = make_output(s_info)
    tg = make_targets()
    got = foreground_masks(tg, s)
    want = ref_fg_masks(tg, s)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g.numpy(), w)
    assert sum(w.sum() for w in want) > 3
    assert all(w[-1].sum() == 0 for w in want)  # the last image has no boxes


def test_hbb_xyxy_targets_work():
    info = make_info(box_dim=4)
    out = make_output(info)
    tg = Targets(
        [torch.tensor([[0.0, 0.0, 24.0, 16.0]]), torch.zeros(0, 4)],
        [torch.tensor([0]), torch.zeros(0, dtype=torch.long)],
        (32, 48),
    )
    m = foreground_masks(tg, out)[0]
    # exactly the stride-8 cells [0, 24) x [0, 16); the next ones share only an edge with the box
    assert m[0, 0].sum() == 6 and m[0, 0, :2, :3].all() and m[1].sum() == 0


@pytest.mark.parametrize("name", list(CASES))
def test_nsd_matches_float64_reference(name):
    d, s, t, tg, ref = case(name)
    terms = d(s, t, tg, epoch=5.0)
    assert sorted(terms) == sorted(f"nsd.{k}" for k in ref)
    for k, v in ref.items():
        assert float(terms[f"nsd.{k}"]) == pytest.approx(v, rel=2e-5, abs=1e-7), k
        assert v > 0


@pytest.mark.parametrize("name", list(CASES))
def test_nsd_matches_golden(name):
    golden = json.loads(GOLDEN.read_text())
    d, s, t, tg, _ = case(name)
    terms = d(s, t, tg, epoch=5.0)
    for k, v in golden[name].items():
        assert float(terms[f"nsd.{k}"]) == pytest.approx(v, rel=2e-5, abs=1e-7), k


def test_logit_warmup():
    d, s, t, tg, _ = case("nsd_four_parts")
    full = float(d(s, t, tg, epoch=3.0)["nsd.logit"])
    assert float(d(s, t, tg, epoch=1.5)["nsd.logit"]) == pytest.approx(full / 2, rel=1e-6)
    assert float(d(s, t, tg, epoch=0.0)["nsd.logit"]) == 0.0
    assert float(d(s, t, tg, epoch=9.0)["nsd.logit"]) == pytest.approx(full, rel=1e-6)
    # the other parts do not ramp
    assert float(d(s, t, tg, epoch=0.0)["nsd.box"]) == pytest.approx(float(d(s, t, tg, epoch=9.0)["nsd.box"]))


def test_topk_selects_hard_negatives_only():
    from rkd.distill.detection.nsd import select_ncs

    gen = torch.Generator().manual_seed(3)
    neg = torch.rand(3, 50, generator=gen) < 0.5
    score = torch.rand(3, 50, generator=gen)
    sel = select_ncs(neg, score, "topk", k=5)
    assert (sel <= neg).all() and (sel.sum(1) == 5).all()
    for i in range(3):
        assert score[i][sel[i]].min() >= score[i][neg[i] & ~sel[i]].max()
    few = torch.zeros(1, 50, dtype=torch.bool)
    few[0, :3] = True
    assert select_ncs(few, torch.rand(1, 50), "topk", k=10).sum() == 3


def test_gradients_student_and_adapters_never_teacher():
    s_info, t_info = infos()
    s = make_output(s_info, gen=torch.Generator().manual_seed(5), requires_grad=True)
    t = make_output(t_info, gen=torch.Generator().manual_seed(6), requires_grad=True)
    d = build_distiller({"nsd": FOUR}, s_info, t_info)
    d.total(d(s, t, make_targets(), epoch=4.0)).backward()
    for group in (s.features, s.cls_logits, s.box_regs, s.angle_logits):
        assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in group)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.components["nsd"].adapters.parameters())
    for group in (t.features, t.cls_logits, t.box_regs, t.angle_logits):
        assert all(x.grad is None for x in group)


def test_zero_when_student_equals_teacher():
    info, _ = infos()
    s = make_output(info, gen=torch.Generator().manual_seed(8))
    d = build_distiller({"nsd": {**FOUR, "csl_sigma": 0.0, "ce_mix": 0.0, "fg_weight": 1.0}}, info, info)
    with torch.no_grad():
        for conv, c in zip(d.components["nsd"].adapters, info.level_channels):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(c)
            conv.bias.zero_()
    terms = d(s, s, make_targets(), epoch=5.0)
    assert sorted(terms) == ["nsd.angle", "nsd.box", "nsd.logit", "nsd.pixel"]
    assert all(abs(float(v)) < 1e-5 for v in terms.values()), terms
    other = make_output(info, gen=torch.Generator().manual_seed(9))
    assert all(float(v) > 1e-3 for v in d(s, other, make_targets(), epoch=5.0).values())


def test_nsd_refuses_hbb_and_missing_angle_bins():
    hbb = make_info(box_dim=4)
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {}}, hbb, hbb)
    assert err.value.path == "nsd" and "oriented boxes" in err.value.message and "nsd.angle: false" in err.value.message
    obb = make_info(angle_bins=0)
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {}}, obb, make_info(angle_bins=BINS))
    assert "angle classification branch" in err.value.message and "student" in err.value.message
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {}}, make_info(angle_bins=BINS), make_info(angle_bins=BINS * 2))
    assert "angle bins" in err.value.message
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {p: False for p in ("pixel", "logit", "box", "angle")}}, obb, obb)
    assert "at least one" in err.value.message
    # without the angle part, horizontal-box detectors are fine
    d = build_distiller({"nsd": {**FOUR, "angle": False}}, hbb, hbb)
    terms = d(make_output(hbb), make_output(hbb, gen=torch.Generator().manual_seed(3)), make_targets(), epoch=5)
    assert sorted(terms) == ["nsd.box", "nsd.logit", "nsd.pixel"]


def test_nsd_with_no_selected_negatives_is_zero_and_finite():
    s_info, t_info = infos()
    s = make_output(s_info, requires_grad=True)
    t = make_output(t_info, gen=torch.Generator().manual_seed(2))
    t.cls_logits = [torch.full_like(x, -20.0) for x in t.cls_logits]  # teacher scores ~2e-9 < threshold
    d = build_distiller({"nsd": {"box": True, "ncs": "threshold", "threshold": 0.01}}, s_info, t_info)
    terms = d(s, t, make_targets(), epoch=5.0)
    assert sorted(terms) == ["nsd.angle", "nsd.box", "nsd.logit"]
    assert all(float(v) == 0.0 for v in terms.values())
    d.total(terms).backward()  # still differentiable (zero gradient)


def test_nsd_bad_params_name_path():
    with pytest.raises(SpecError) as err:
        validate_methods({"nsd": {"ncs": "hardest"}})
    assert err.value.path == "nsd.ncs"
    with pytest.raises(SpecError) as err:
        validate_methods({"nsd": {"k": 2.5}})
    assert err.value.path == "nsd.k"


def test_nsd_without_assignment_is_a_clear_error():
    s_info, t_info = infos()
    s, t = make_output(s_info), make_output(t_info)
    s.assignment = t.assignment = None
    d = build_distiller({"nsd": {"pixel": False}}, s_info, t_info)
    with pytest.raises(ValueError, match="assignment"):
        d(s, t, make_targets())


if __name__ == "__main__" and "--regen" in sys.argv:
    from goldens import regenerate

    regenerate(GOLDEN, {name: case(name)[-1] for name in CASES})
