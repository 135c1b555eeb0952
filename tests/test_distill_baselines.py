"""Baselines AT, FGD, FRS, PKD, CWD: float64 references, goldens, gradients, zero at equality.

Regenerate their goldens with ``python tests/test_distill_baselines.py --regen``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import (
    conv3x3_np,
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

from rkd.distill import KD_METHODS, build_distiller, validate_methods
from rkd.distill.detection.fgd import fgd_masks
from rkd.errors import SpecError

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
GOLDEN = Path(__file__).parent / "fixtures" / "kd_golden_core.json"


# ----------------------------------------------------------------------------- references


def align_np(adapter, x: np.ndarray) -> np.ndarray:
    if isinstance(adapter, torch.nn.Identity):
        return x
    w = np64(adapter.weight)[:, :, 0, 0]
    return np.einsum("oc,bchw->bohw", w, x) + np64(adapter.bias)[None, :, None, None]


def ref_at(s, t, hp, comp) -> dict[str, float]:
    total = 0.0
    for fs, ft in zip(s.features, t.features):
        qs = (np64(fs) ** 2).mean(1).reshape(fs.shape[0], -1)
        qt = (np64(ft) ** 2).mean(1).reshape(ft.shape[0], -1)
        qs = qs / np.sqrt((qs**2).sum(1, keepdims=True))
        qt = qt / np.sqrt((qt**2).sum(1, keepdims=True))
        total += ((qs - qt) ** 2).mean()
    return {"attn": hp["weight"] / 2 * total}


def ref_pkd(s, t, hp, comp) -> dict[str, float]:
    total = 0.0
    for a, fs, ft in zip(comp.adapters, s.features, t.features):
        x, y = align_np(a, np64(fs)), np64(ft)
        c = x.shape[1]
        # Pearson form: per channel, standardise the B*H*W values (unbiased std)
        xs = x.transpose(1, 0, 2, 3).reshape(c, -1)
        ys = y.transpose(1, 0, 2, 3).reshape(c, -1)
        xs = (xs - xs.mean(1, keepdims=True)) / (xs.std(1, ddof=1, keepdims=True) + 1e-6)
        ys = (ys - ys.mean(1, keepdims=True)) / (ys.std(1, ddof=1, keepdims=True) + 1e-6)
        total += ((xs - ys) ** 2).mean() / 2
    return {"feat": hp["weight"] * total}


def ref_cwd(s, t, hp, comp) -> dict[str, float]:
    tau = hp["temperature"]
    total = 0.0
    for a, fs, ft in zip(comp.adapters, s.features, t.features):
        x, y = align_np(a, np64(fs)), np64(ft)
        b, c = x.shape[:2]
        kl = 0.0
        for i in range(b):
            for ch in range(c):
                ps = np.exp(x[i, ch].ravel() / tau)
                ps /= ps.sum()
                pt = np.exp(y[i, ch].ravel() / tau)
                pt /= pt.sum()
                kl += (pt * np.log(pt / ps)).sum()
        total += tau**2 * kl / (b * c)
    return {"feat": hp["weight"] * total}


def ref_frs(s, t, hp, comp) -> dict[str, float]:
    feat = cls = 0.0
    for a, fs, ft, cs, ct in zip(comp.adapters, s.features, t.features, s.cls_logits, t.cls_logits):
        m = sigmoid(np64(ct)).max(1, keepdims=True)
        d2 = (np64(ft) - conv3x3_np(np64(fs), np64(a.weight), np64(a.bias))) ** 2
        feat += (d2 * m).sum() / m.sum()
        p, q = sigmoid(np64(ct)), sigmoid(np64(cs))
        bce = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))  # binary KL
        cls += (bce * m).sum() / m.sum()
    return {"feat": hp["feat_weight"] * feat, "cls": hp["cls_weight"] * cls}


def ref_fgd_masks(targets, out) -> tuple[list[np.ndarray], list[np.ndarray]]:
    fgs, bgs = [], []
    for f, st in zip(out.features, out.info.strides):
        b, _, h, w = f.shape
        fg = np.zeros((b, 1, h, w))
        for i in range(b):
            for box in targets.boxes[i].tolist():
                poly = Polygon(corners(box))
                cells = [(y, x) for y in range(h) for x in range(w) if touches_cell(poly, x, y, st)]
                for y, x in cells:
                    fg[i, 0, y, x] = max(fg[i, 0, y, x], 1.0 / len(cells))
        bg = (fg == 0).astype(float)
        for i in range(b):
            if bg[i].sum():
                bg[i] /= bg[i].sum()
        fgs.append(fg)
        bgs.append(bg)
    return fgs, bgs


def ref_gc(block, x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    logits = np.einsum("c,bchw->bhw", np64(block.mask.weight)[0, :, 0, 0], x) + float(block.mask.bias.detach())
    e = np.exp(logits.reshape(b, -1) - logits.reshape(b, -1).max(1, keepdims=True))
    att = e / e.sum(1, keepdims=True)
    ctx = np.einsum("bcn,bn->bc", x.reshape(b, c, -1), att)
    conv1, ln, _, conv2 = block.transform
    hid = ctx @ np64(conv1.weight)[:, :, 0, 0].T + np64(conv1.bias)
    mu, var = hid.mean(1, keepdims=True), hid.var(1, keepdims=True)
    hid = (hid - mu) / np.sqrt(var + ln.eps) * np64(ln.weight)[:, 0, 0] + np64(ln.bias)[:, 0, 0]
    hid = np.maximum(hid, 0)
    out = hid @ np64(conv2.weight)[:, :, 0, 0].T + np64(conv2.bias)
    return x + out[:, :, None, None]


def ref_fgd(s, t, hp, comp, targets) -> dict[str, float]:
    temp = hp["temperature"]
    fgs, bgs = ref_fgd_masks(targets, s)
    sums = np.zeros(4)
    for lvl, (fs, ft) in enumerate(zip(s.features, t.features)):
        x, y = align_np(comp.adapters[lvl], np64(fs)), np64(ft)
        b, c, h, w = y.shape

        def attn(f, b=b, c=c, h=h, w=w):  # this level's shape, bound now
            sp = np.abs(f).mean(1).reshape(b, -1) / temp
            sp = h * w * np.exp(sp) / np.exp(sp).sum(1, keepdims=True)
            ch = np.abs(f).mean((2, 3)) / temp
            ch = c * np.exp(ch) / np.exp(ch).sum(1, keepdims=True)
            return sp.reshape(b, 1, h, w), ch.reshape(b, c, 1, 1)

        st, ct = attn(y)
        ss, cs = attn(x)
        d2 = (x - y) ** 2 * st * ct
        sums[0] += (d2 * fgs[lvl]).sum() / b
        sums[1] += (d2 * bgs[lvl]).sum() / b
        sums[2] += (np.abs(cs - ct).sum() + np.abs(ss - st).sum()) / b
        sums[3] += ((ref_gc(comp.gc_teacher[lvl], y) - ref_gc(comp.gc_student[lvl], x)) ** 2).sum() / b
    return {
        "fg": hp["alpha"] * sums[0],
        "bg": hp["beta"] * sums[1],
        "attn": hp["gamma"] * sums[2],
        "global": hp["lambda"] * sums[3],
    }


REFS = {"at": ref_at, "pkd": ref_pkd, "cwd": ref_cwd, "frs": ref_frs, "fgd": ref_fgd}

CASES = {
    "at_default": ("at", {}),
    "pkd_default": ("pkd", {}),
    "cwd_default": ("cwd", {}),
    "cwd_tau": ("cwd", {"temperature": 3.0, "weight": 0.5}),
    "frs_default": ("frs", {}),
    "fgd_default": ("fgd", {}),
    "fgd_custom": ("fgd", {"temperature": 1.5, "alpha": 0.01, "lambda": 1e-4}),
}


def case(name: str, channels_t=(12, 8)):
    method, hp_given = CASES[name]
    s_info = make_info(channels=(6, 8), num_anchors=2)
    t_info = make_info(channels=channels_t, num_anchors=2)
    s = make_output(s_info, gen=torch.Generator().manual_seed(51))
    t = make_output(t_info, gen=torch.Generator().manual_seed(52))
    tg = make_targets()
    cfg = {method: hp_given}
    d = build_distiller(cfg, s_info, t_info)
    comp = d.components[method]
    set_conv_weights(comp, 53)
    hp = validate_methods(cfg)[method]
    ref = ref_fgd(s, t, hp, comp, tg) if method == "fgd" else REFS[method](s, t, hp, comp)
    return d, s, t, tg, ref, method


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    d, s, t, tg, ref, method = case(name)
    terms = d(s, t, tg)
    assert sorted(terms) == sorted(f"{method}.{k}" for k in ref)
    for k, v in ref.items():
        assert float(terms[f"{method}.{k}"]) == pytest.approx(v, rel=5e-5, abs=1e-9), k
        assert v > 0


@pytest.mark.parametrize("name", list(CASES))
def test_matches_golden(name):
    golden = json.loads(GOLDEN.read_text())[name]
    d, s, t, tg, _, method = case(name)
    terms = d(s, t, tg)
    for k, v in golden.items():
        assert float(terms[f"{method}.{k}"]) == pytest.approx(v, rel=5e-5, abs=1e-9), k


def test_fgd_masks_match_reference_and_sums():
    info = make_info(channels=(4, 4), strides=(4, 8))
    out = make_output(info, image_size=(64, 48))
    tg = make_targets((64, 48))
    fgs, bgs = fgd_masks(tg, out)
    rfg, rbg = ref_fgd_masks(tg, out)
    for a, b in zip(fgs + bgs, rfg + rbg):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-7)
    for bg in bgs:  # background normalised to 1 per image
        np.testing.assert_allclose(bg.sum((1, 2, 3)).numpy(), [1.0, 1.0], rtol=1e-5)
    assert float(fgs[0][0].max()) <= 1.0 and float(fgs[0][0].sum()) > 0 and float(fgs[0][1].sum()) == 0


@pytest.mark.parametrize("method", ["at", "pkd", "cwd", "fgd", "frs"])
def test_gradients_reach_student_and_learnable_parts_never_teacher(method):
    s_info, t_info = make_info(channels=(6, 8)), make_info(channels=(12, 8))
    s = make_output(s_info, gen=torch.Generator().manual_seed(5), requires_grad=True)
    t = make_output(t_info, gen=torch.Generator().manual_seed(6), requires_grad=True)
    d = build_distiller({method: {}}, s_info, t_info)
    if method == "fgd":
        set_conv_weights(d, 3)  # non-zero GC transforms, so every GC parameter is on the gradient path
    d.total(d(s, t, make_targets())).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s.features)
    if method == "frs":
        assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s.cls_logits)
    params = list(d.parameters())
    assert (len(params) > 0) == (method != "at")
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for x in t.features + t.cls_logits + t.box_regs:
        assert x.grad is None


@pytest.mark.parametrize("method", ["at", "pkd", "cwd", "fgd", "frs"])
def test_zero_when_student_equals_teacher(method):
    info = make_info(channels=(6, 8))
    s = make_output(info, gen=torch.Generator().manual_seed(8))
    d = build_distiller({method: {}}, info, info)
    if method == "frs":
        with torch.no_grad():
            for conv, c in zip(d.components["frs"].adapters, info.level_channels):
                conv.weight.zero_()
                conv.weight[:, :, 1, 1] = torch.eye(c)
                conv.bias.zero_()
    terms = d(s, s, make_targets())
    for k, v in terms.items():
        if k == "frs.cls":  # BCE with soft targets: the teacher's entropy, not 0
            continue
        assert abs(float(v)) < 1e-6, k
    other = make_output(info, gen=torch.Generator().manual_seed(9))
    terms2 = d(s, other, make_targets())
    for k, v in terms2.items():
        if k == "fgd.global":  # zero-initialised GC transforms: 0 until they learn (then > 0, see reference)
            continue
        assert float(v) > 0, k


def test_published_defaults():
    want = {
        "at": {"weight": 1000.0},
        "pkd": {"weight": 10.0},
        "cwd": {"weight": 5.0, "temperature": 1.0},
        "frs": {"feat_weight": 0.005, "cls_weight": 0.02},
        "fgd": {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6, "temperature": 0.5},
    }
    assert validate_methods({m: {} for m in want}) == want
    for m in want:
        assert KD_METHODS[m].__doc__


def test_baselines_refuse_different_grids():
    for m in ("at", "pkd", "cwd", "fgd", "frs"):
        with pytest.raises(SpecError) as err:
            build_distiller({m: {}}, make_info(strides=(8, 16)), make_info(strides=(16, 32)))
        assert err.value.path == m and "strides" in err.value.message


def test_hbb_detectors_work():
    info = make_info(box_dim=4)
    s, t = make_output(info), make_output(info, gen=torch.Generator().manual_seed(4))
    d = build_distiller({m: {} for m in ("at", "pkd", "cwd", "fgd", "frs")}, info, info)
    terms = d(s, t, make_targets())
    assert len(terms) == 1 + 1 + 1 + 4 + 2 and all(torch.isfinite(v) for v in terms.values())


if __name__ == "__main__" and "--regen" in sys.argv:
    from goldens import regenerate

    regenerate(GOLDEN, {name: case(name)[-2] for name in CASES})
