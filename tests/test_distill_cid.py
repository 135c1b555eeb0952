"""CID + Light-ML: instance masks and losses against float64 references, goldens, gradients.

Regenerate the CID goldens with ``python tests/test_distill_cid.py --regen``.
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
    corners,
    make_info,
    make_output,
    make_targets,
    np64,
    set_conv_weights,
    sigmoid,
    touches_cell,
)
from shapely.geometry import Polygon

from rkd.distill import build_distiller, validate_methods
from rkd.distill.detection.cid import LightML
from rkd.distill.masks import centerness_instance_masks
from rkd.errors import SpecError
from rkd.outputs import Targets

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
GOLDEN = Path(__file__).parent / "fixtures" / "kd_golden_core.json"


# ----------------------------------------------------------------------------- references


def line_distance(p, a, b) -> float:
    """Distance from point p to the line through a and b."""
    (px, py), (ax, ay), (bx, by) = p, a, b
    return abs((bx - ax) * (ay - py) - (ax - px) * (by - ay)) / math.hypot(bx - ax, by - ay)


def ref_cid_masks(targets: Targets, out, gamma: float) -> list[np.ndarray]:
    """Per-instance normalised centerness on the cells a box overlaps (shapely), by loops.

    The centerness of a cell's centre is taken in the box grown on each side by the cell's reach,
    half the cell's extent projected on the box's axes (from the cell's corners); the centre's
    box-frame offsets come from its distances to the side lines: ``d_l^2 - d_r^2 = 2 w u``.
    """
    levels = [(f.shape[0], f.shape[-2], f.shape[-1], s) for f, s in zip(out.features, out.info.strides)]
    masks = [np.zeros((b, 1, h, w)) for b, h, w, _ in levels]
    for i, boxes in enumerate(targets.boxes):
        for box in boxes.tolist():
            c = corners(box)  # (+w,+h), (-w,+h), (-w,-h), (+w,-h) in the box frame
            poly = Polygon(c)
            bw, bh = math.dist(c[0], c[1]), math.dist(c[0], c[3])
            axis = ((c[0][0] - c[1][0]) / bw, (c[0][1] - c[1][1]) / bw)  # unit w-axis
            per_level = []
            for _b, h, w, s in levels:
                # the cell's half extent along either box axis (a square projects alike on both)
                reach = max(abs(sx * axis[0] + sy * axis[1]) for sx in (-s / 2, s / 2) for sy in (-s / 2, s / 2))
                m = np.zeros((h, w))
                for y in range(h):
                    for x in range(w):
                        if not touches_cell(poly, x, y, s):
                            continue
                        p = ((x + 0.5) * s, (y + 0.5) * s)
                        d_r = line_distance(p, c[0], c[3])  # side at u = +w/2
                        d_l = line_distance(p, c[1], c[2])  # side at u = -w/2
                        d_b = line_distance(p, c[0], c[1])  # side at v = +h/2
                        d_t = line_distance(p, c[2], c[3])  # side at v = -h/2
                        u, v = (d_l**2 - d_r**2) / (2 * bw), (d_t**2 - d_b**2) / (2 * bh)
                        lft, rgt = bw / 2 + reach + u, bw / 2 + reach - u
                        top, bot = bh / 2 + reach + v, bh / 2 + reach - v
                        ctr = math.sqrt(min(lft, rgt) / max(lft, rgt) * min(top, bot) / max(top, bot))
                        m[y, x] = ctr**gamma
                per_level.append(m)
            total = sum(m.sum() for m in per_level)
            if total > 0:
                for lvl, m in enumerate(per_level):
                    masks[lvl][i, 0] += m / total
    return masks


def conv1x1_np(x, conv) -> np.ndarray:
    return np.einsum("oc,bchw->bohw", np64(conv.weight)[:, :, 0, 0], x) + np64(conv.bias)[None, :, None, None]


def ref_lightml(cls, reg, ml) -> tuple[np.ndarray, np.ndarray]:
    both = np.concatenate([cls, reg], 1)
    return (
        cls + sigmoid(conv1x1_np(both, ml.gate_cls)) * conv1x1_np(reg, ml.lift_cls),
        reg + sigmoid(conv1x1_np(both, ml.gate_reg)) * conv1x1_np(cls, ml.lift_reg),
    )


def ref_cid(student, teacher, targets, hp, comp) -> dict[str, float]:
    masks = ref_cid_masks(targets, student, hp["center_exp"])
    n_ins = max(1.0, sum(m.sum() for m in masks))
    out = {}
    if hp["feat"]:
        tot = 0.0
        for conv, fs, ft, m in zip(comp.adapters, student.features, teacher.features, masks):
            d2 = (conv1x1_np(np64(fs), conv) - np64(ft)) ** 2
            tot += (d2.mean(1, keepdims=True) * m).sum()
        out["feat"] = hp["feat_weight"] * tot / n_ins
    if hp["head"]:
        c_tot = r_tot = 0.0
        for cs, rs, ct, rt, m in zip(student.cls_logits, student.box_regs, teacher.cls_logits, teacher.box_regs, masks):
            cs, rs, ct, rt = np64(cs), np64(rs), np64(ct), np64(rt)
            if hp["lightml"]:
                cs, rs = ref_lightml(cs, rs, comp.lightml)
            p, q = sigmoid(ct), sigmoid(cs)
            bce = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))  # binary KL
            c_tot += (bce.mean(1, keepdims=True) * m).sum()
            r_tot += (np.abs(rs - rt).mean(1, keepdims=True) * m).sum()
        out["cls"] = hp["cls_weight"] * c_tot / n_ins
        out["reg"] = hp["reg_weight"] * r_tot / n_ins
    return out


CASES = {
    "cid_default": {},
    "cid_no_lightml": {"lightml": False, "center_exp": 2.5, "feat_weight": 0.3},
    "cid_head_only": {"feat": False, "cls_weight": 2.0, "reg_weight": 0.5, "center_exp": 0.5},
}


def case(name: str):
    s_info = make_info(channels=(6, 10), num_anchors=2)
    t_info = make_info(channels=(12, 8), num_anchors=2)
    s = make_output(s_info, gen=torch.Generator().manual_seed(41))
    t = make_output(t_info, gen=torch.Generator().manual_seed(42))
    tg = make_targets()
    cfg = {"cid": CASES[name]}
    d = build_distiller(cfg, s_info, t_info)
    comp = d.components["cid"]
    set_conv_weights(comp, 43)
    return d, s, t, tg, ref_cid(s, t, tg, validate_methods(cfg)["cid"], comp)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_instance_mask_matches_reference_and_sums_to_instances(gamma):
    info = make_info(channels=(4, 4, 4), strides=(4, 8, 16))
    out = make_output(info, image_size=(64, 48), batch=3)
    tg = make_targets((64, 48), batch=3)
    got = centerness_instance_masks(tg, out, gamma)
    want = ref_cid_masks(tg, out, gamma)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)
    per_image = sum(g.sum((1, 2, 3)) for g in got)
    # every box touches some cells, so each image sums to its box count
    np.testing.assert_allclose(per_image.numpy(), [3.0, 3.0, 0.0], rtol=1e-5)
    assert max(float(g.max()) for g in got) <= 1.0


def test_instance_mask_equal_per_instance_whatever_the_size():
    info = make_info(channels=(4,), strides=(4,))
    out = make_output(info, image_size=(64, 64), batch=1)
    big = [32.0, 32.0, 40.0, 30.0, 0.3]
    small = [8.0, 8.0, 7.0, 6.0, -1.0]
    tg = Targets([torch.tensor([big, small])], [torch.tensor([0, 1])], (64, 64))
    m = centerness_instance_masks(tg, out)[0][0, 0]
    ys, xs = torch.meshgrid(torch.arange(16) * 4 + 2.0, torch.arange(16) * 4 + 2.0, indexing="ij")
    near_small = ((xs - 8) ** 2 + (ys - 8) ** 2) < 8.5**2  # the small box's cells; the big box's are >= 10 px away
    assert float(m[near_small].sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(m[~near_small].sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(m[near_small].max()) > 5 * float(m[~near_small].max())  # a small instance's centre counts most


@pytest.mark.parametrize("name", list(CASES))
def test_cid_matches_reference(name):
    d, s, t, tg, ref = case(name)
    terms = d(s, t, tg)
    assert sorted(terms) == sorted(f"cid.{k}" for k in ref)
    for k, v in ref.items():
        assert float(terms[f"cid.{k}"]) == pytest.approx(v, rel=2e-5, abs=1e-8), k
        assert v > 0


@pytest.mark.parametrize("name", list(CASES))
def test_cid_matches_golden(name):
    golden = json.loads(GOLDEN.read_text())[name]
    d, s, t, tg, _ = case(name)
    terms = d(s, t, tg)
    for k, v in golden.items():
        assert float(terms[f"cid.{k}"]) == pytest.approx(v, rel=2e-5, abs=1e-8), k


def test_lightml_starts_as_identity_and_lifts_after_training():
    ml = LightML(6, 10)
    c, r = torch.randn(2, 6, 3, 3), torch.randn(2, 10, 3, 3)
    c2, r2 = ml(c, r)
    assert torch.equal(c2, c) and torch.equal(r2, r)
    set_conv_weights(ml, 0)
    c3, r3 = ml(c, r)
    assert (c3 - c).abs().max() > 1e-3 and (r3 - r).abs().max() > 1e-3


def test_gradients_reach_student_adapters_lightml_never_teacher():
    s_info, t_info = make_info(channels=(6, 10)), make_info(channels=(12, 8))
    s = make_output(s_info, gen=torch.Generator().manual_seed(5), requires_grad=True)
    t = make_output(t_info, gen=torch.Generator().manual_seed(6), requires_grad=True)
    d = build_distiller({"cid": {}}, s_info, t_info)
    comp = d.components["cid"]
    d.total(d(s, t, make_targets())).backward()
    for group in (s.features, s.cls_logits, s.box_regs):
        assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in group)
    for p in (
        list(comp.adapters.parameters())
        + list(comp.lightml.lift_cls.parameters())
        + list(comp.lightml.lift_reg.parameters())
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for group in (t.features, t.cls_logits, t.box_regs):
        assert all(x.grad is None for x in group)
    # once lifting is non-zero, the gates learn too
    set_conv_weights(comp.lightml, 1)
    comp.zero_grad()
    d.total(d(s, t, make_targets())).backward()
    assert comp.lightml.gate_cls.weight.grad.abs().sum() > 0 and comp.lightml.gate_reg.weight.grad.abs().sum() > 0


def test_zero_when_student_equals_teacher():
    info = make_info(channels=(6, 10))
    s = make_output(info, gen=torch.Generator().manual_seed(8), requires_grad=True)
    d = build_distiller({"cid": {}}, info, info)
    with torch.no_grad():
        for conv, c in zip(d.components["cid"].adapters, info.level_channels):
            conv.weight.copy_(torch.eye(c)[:, :, None, None])
            conv.bias.zero_()
    terms = d(s, s, make_targets())
    assert float(terms["cid.feat"]) == 0.0 and float(terms["cid.reg"]) == 0.0
    # the class term is the teacher's binary entropy there: its gradient vanishes
    terms["cid.cls"].backward()
    assert max(float(x.grad.abs().max()) for x in s.cls_logits) < 1e-7
    other = make_output(info, gen=torch.Generator().manual_seed(9))
    assert all(float(v) > 1e-3 for v in d(s, other, make_targets()).values())


def test_no_instances_gives_zero_terms():
    info = make_info()
    s, t = make_output(info), make_output(info, gen=torch.Generator().manual_seed(2))
    empty = Targets([torch.zeros(0, 5)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (32, 48))
    terms = build_distiller({"cid": {}}, info, info)(s, t, empty)
    assert all(float(v) == 0.0 and torch.isfinite(v) for v in terms.values())


def test_cid_refuses_empty_selection_and_bad_values():
    info = make_info()
    with pytest.raises(SpecError) as err:
        build_distiller({"cid": {"feat": False, "head": False}}, info, info)
    assert err.value.path == "cid" and "feat or head" in err.value.message
    with pytest.raises(SpecError) as err:
        validate_methods({"cid": {"center_exp": "x"}})
    assert err.value.path == "cid.center_exp"
    # Light-ML without head KD has nothing to lift: no module is built
    d = build_distiller({"cid": {"head": False}}, info, info)
    assert not hasattr(d.components["cid"], "lightml")


if __name__ == "__main__" and "--regen" in sys.argv:
    from goldens import regenerate

    regenerate(GOLDEN, {name: case(name)[-1] for name in CASES})
