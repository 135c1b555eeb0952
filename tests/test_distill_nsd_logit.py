"""NSD's negative-core selection, the per-class binary logit form, its refusals and the pixel normaliser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import flat_np, make_info, make_output, make_targets, np64, sigmoid

from rkd.distill import build_distiller
from rkd.distill.base import published_hparams
from rkd.distill.detection.nsd import NSD, select_ncs
from rkd.distill.masks import foreground_masks
from rkd.errors import SpecError

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def binary_kl_np(zs: np.ndarray, zt: np.ndarray, t: float) -> np.ndarray:
    """``T^2 sum_k [p log(p/q) + (1-p) log((1-p)/(1-q))]``, ``p = sigmoid(z_t/T)``, ``q = sigmoid(z_s/T)``."""
    p, q = 1 / (1 + np.exp(-zt / t)), 1 / (1 + np.exp(-zs / t))
    return t * t * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(-1)


def test_binary_kl_matches_float64_reference():
    from rkd.distill.detection.nsd import binary_kl

    gen = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(40, 3, generator=gen) * 4, torch.randn(40, 3, generator=gen) * 4
    zs[0], zt[0] = torch.tensor([-12.0, 9.0, 0.0]), torch.tensor([-15.0, 11.0, 0.0])  # saturated scores
    for t in (1.0, 4.0):
        got = binary_kl(zs, zt, t)
        assert got.shape == (40,)
        np.testing.assert_allclose(got.numpy(), binary_kl_np(np64(zs), np64(zt), t), rtol=2e-5, atol=2e-6)
    assert binary_kl(zt, zt, 4.0).abs().max() < 1e-5  # zero at equality


def test_defaults_distil_the_logits_on_every_negative_and_publish_the_released_parts():
    # rkd's default (measured on UCAS-AOD, docs/benchmarks.md): the logit part alone on every negative;
    # the published configuration keeps the released four parts
    defaults = {name: param.default for name, param in NSD.params.items()}
    assert [p for p in ("pixel", "logit", "box", "angle") if defaults[p]] == ["logit", "angle"]
    assert defaults["ncs"] == "all" and NSD.balance_share == 1.0
    released = {**defaults, **published_hparams(NSD.params)}
    assert all(released[p] for p in ("pixel", "logit", "box", "angle")) and released["ncs"] == "all"


def test_core_selection_picks_exactly_the_teachers_hard_negatives():
    #                    0     1     2     3     4     5     6     7
    neg = torch.tensor(
        [[True, True, True, False, True, True, False, True], [True, False, True, True, True, True, True, True]]
    )
    score = torch.tensor(
        [
            [0.90, 0.01, 0.40, 0.99, 0.05, 0.60, 0.95, 0.02],  # 3, 6: confident positives
            [0.02, 0.97, 0.70, 0.30, 0.80, 0.03, 0.01, 0.50],
        ]
    )
    sel = select_ncs(neg, score, "topk", k=3, threshold=0.35)
    want = torch.tensor(
        [[True, False, True, False, False, True, False, False], [False, False, True, False, True, False, False, True]]
    )
    assert sel.tolist() == want.tolist()


def test_component_distils_only_the_core_with_topk():
    """The student equals the teacher except on easy negatives: the logit and box terms see nothing."""
    info = make_info(num_classes=1)
    s = make_output(info, gen=torch.Generator().manual_seed(4))
    t = make_output(info, gen=torch.Generator().manual_seed(4))
    k = 5
    a = info.num_anchors
    zt = flat_np(t.cls_logits, a)[..., 0]
    neg = t.assignment.neg_mask.numpy()
    easy = np.zeros_like(neg)
    for i in range(neg.shape[0]):
        idx = np.nonzero(neg[i])[0]
        easy[i, idx[np.argsort(-zt[i, idx], kind="stable")][k:]] = True
    assert easy.sum() > 10
    # perturb the student's logits and boxes on the easy negatives only
    offset = 0
    for lvl, (c, b) in enumerate(zip(s.cls_logits, s.box_regs)):
        _, _, h, w = c.shape
        m = torch.from_numpy(easy[:, offset : offset + h * w * a]).view(-1, h, w, a).permute(0, 3, 1, 2)
        offset += h * w * a
        s.cls_logits[lvl] = c + 3.0 * m.float()
        s.box_regs[lvl] = b + 3.0 * m.repeat_interleave(info.box_dim, 1).float()
    d = build_distiller({"nsd": {"box": True, "angle": False, "ncs": "topk", "k": k}}, info, info)
    terms = d(s, t, make_targets(), epoch=5.0)
    assert float(terms["nsd.logit"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["nsd.box"]) == pytest.approx(0.0, abs=1e-6)
    d_all = build_distiller({"nsd": {"box": True, "angle": False, "ncs": "all"}}, info, info)
    terms_all = d_all(s, t, make_targets(), epoch=5.0)
    assert float(terms_all["nsd.logit"]) > 1e-2 and float(terms_all["nsd.box"]) > 1e-2


def test_softmax_logit_form_with_one_class_is_refused():
    one = make_info(num_classes=1)
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {"angle": False, "logit_form": "softmax"}}, one, one)
    assert err.value.path == "nsd"
    assert "identically 0" in err.value.message and "logit_form: binary" in err.value.message
    no_logit = {"box": True, "angle": False, "logit_form": "softmax", "logit": False}
    build_distiller({"nsd": no_logit}, one, one)  # no logit term
    three = make_info(num_classes=3)
    build_distiller({"nsd": {"angle": False, "logit_form": "softmax"}}, three, three)


def test_angle_nckd_with_two_bins_is_refused():
    two = make_info(angle_bins=2)
    with pytest.raises(SpecError) as err:
        build_distiller({"nsd": {}}, two, two)
    assert "angle bins" in err.value.message and "identically 0" in err.value.message


@pytest.mark.parametrize("num_classes", [1, 2])
def test_binary_logit_form_carries_signal_for_one_or_two_classes(num_classes):
    info = make_info(num_classes=num_classes)
    s = make_output(info, gen=torch.Generator().manual_seed(11), requires_grad=True)
    t = make_output(info, gen=torch.Generator().manual_seed(12))
    hp = {"pixel": False, "box": False, "angle": False, "ncs": "all"}
    d = build_distiller({"nsd": hp}, info, info)
    comp = d.components["nsd"]
    assert comp.hparams["logit_form"] == "binary"  # the default for these sigmoid heads
    logit = d(s, t, make_targets(), epoch=5.0)["nsd.logit"]
    a = info.num_anchors
    zs, zt = flat_np(s.cls_logits, a), flat_np(t.cls_logits, a)
    sel = s.assignment.neg_mask.numpy()  # the student's assignment comes first
    hpr = comp.hparams
    want = hpr["logit_weight"] * hpr["beta"] * binary_kl_np(zs[sel], zt[sel], hpr["temperature"]).sum() / sel.sum()
    assert float(logit) == pytest.approx(want, rel=2e-5) and want > 1e-2
    logit.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s.cls_logits)
    # the binary form sees absolute scores: shifting every class logit by the same amount changes it,
    # while the softmax form (K = 2) cannot tell
    if num_classes == 2:
        shifted = make_output(info, gen=torch.Generator().manual_seed(12))
        shifted.cls_logits = [x + 2.0 for x in t.cls_logits]
        assert float(d(t, shifted, make_targets(), epoch=5.0)["nsd.logit"]) > 1e-2
        soft = build_distiller({"nsd": {**hp, "logit_form": "softmax"}}, info, info)
        assert float(soft(t, shifted, make_targets(), epoch=5.0)["nsd.logit"]) == pytest.approx(0.0, abs=1e-5)


def test_pixel_term_is_a_per_element_mean():
    """phi(s) = 0 and t = 1 everywhere: every squared error is 1, so each level's L_bg is 1/2 whatever C."""
    for channels in ((8, 8), (64, 32)):
        s_info = make_info(channels=(4, 4), angle_bins=0)
        t_info = make_info(channels=channels, angle_bins=0)
        s = make_output(s_info)
        t = make_output(t_info)
        t.features = [torch.ones_like(f) for f in t.features]
        hp = {"pixel": True, "logit": False, "angle": False, "fg_weight": 3.0}
        d = build_distiller({"nsd": hp}, s_info, t_info)
        with torch.no_grad():
            for conv in d.components["nsd"].adapters:
                conv.weight.zero_()
                conv.bias.zero_()
        pixel = float(d(s, t, make_targets(), epoch=5.0)["nsd.pixel"])
        assert pixel == pytest.approx((3.0 + 12.0) / 2, rel=1e-6), channels  # mean over levels of w_fg/2 + w_bg/2


def standardise_np(f: np.ndarray) -> np.ndarray:
    """Per channel over (B, H, W), Bessel-corrected std (the reference of ``pixel_norm: standardise``)."""
    mean = f.mean(axis=(0, 2, 3), keepdims=True)
    return (f - mean) / (f.std(axis=(0, 2, 3), ddof=1, keepdims=True) + 1e-6)


def test_standardised_pixel_term_matches_reference_and_ignores_the_students_scale():
    s_info = make_info(channels=(4, 4), angle_bins=0)
    t_info = make_info(channels=(8, 8), angle_bins=0)
    hp = {"pixel": True, "logit": False, "angle": False, "fg_weight": 2.0, "pixel_norm": "standardise"}
    d = build_distiller({"nsd": hp}, s_info, t_info, balance={"mode": "off"}).double()
    comp = d.components["nsd"]
    s, t, targets = make_output(s_info), make_output(t_info), make_targets()
    s.features = [f.double() * 3.0 + 1.0 for f in s.features]
    t.features = [f.double() * 5.0 - 2.0 for f in t.features]
    with torch.no_grad():
        for conv in comp.adapters:
            conv.bias.zero_()  # the adapter is then linear: scaling its input scales its output
        pixel = float(d(s, t, targets, epoch=5.0)["nsd.pixel"])
        fgs = foreground_masks(targets, s)
        expected = 0.0
        for conv, fs, ft, fg in zip(comp.adapters, s.features, t.features, fgs):
            a, b, m = standardise_np(np64(conv(fs))), standardise_np(np64(ft)), np64(fg)
            sq = ((a - b) ** 2).sum(axis=1, keepdims=True)  # over channels
            c = b.shape[1]
            l_fg = (sq * m).sum() / max(2 * c * m.sum(), 1.0)
            l_bg = (sq * (1 - m)).sum() / max(2 * c * (1 - m).sum(), 1.0)
            expected += 2.0 * l_fg + 12.0 * l_bg
        assert pixel == pytest.approx(expected / len(fgs), rel=1e-6)
        # the released form grows with the student's feature scale; the standardised one does not
        s.features = [f * 7.0 for f in s.features]
        assert float(d(s, t, targets, epoch=5.0)["nsd.pixel"]) == pytest.approx(
            pixel, rel=1e-5
        )  # up to the 1e-6 in std + eps
        raw = build_distiller({"nsd": {**hp, "pixel_norm": "none"}}, s_info, t_info, balance={"mode": "off"}).double()
        raw.load_state_dict(d.state_dict())
        big = float(raw(s, t, targets, epoch=5.0)["nsd.pixel"])
        s.features = [f / 7.0 for f in s.features]
        assert big > 2 * float(raw(s, t, targets, epoch=5.0)["nsd.pixel"])


@pytest.mark.parametrize("ncs, positives", [("gap", False), ("topk", True), ("gap", True)])
def test_gap_selection_and_positives_match_float64_reference(ncs, positives):
    """``ncs: gap`` keeps the k negatives with the largest max-class |sigmoid(z_s) - sigmoid(z_t)|;
    ``positives: true`` adds the assignment's positives to S for the logit and box terms."""
    info = make_info(num_classes=2)
    s = make_output(info, gen=torch.Generator().manual_seed(21))
    t = make_output(info, gen=torch.Generator().manual_seed(22))
    k = 7
    hp = {"box": True, "angle": False, "ncs": ncs, "positives": positives, "k": k}
    d = build_distiller({"nsd": hp}, info, info)
    terms = d(s, t, make_targets(), epoch=5.0)
    a = info.num_anchors
    zs, zt = flat_np(s.cls_logits, a), flat_np(t.cls_logits, a)
    score = np.abs(sigmoid(zs) - sigmoid(zt)).max(-1) if ncs == "gap" else sigmoid(zt).max(-1)
    neg, pos = s.assignment.neg_mask.numpy(), s.assignment.pos_mask.numpy()
    sel = np.zeros_like(neg)
    for i in range(neg.shape[0]):
        idx = np.nonzero(neg[i])[0]
        sel[i, idx[np.argsort(-score[i, idx], kind="stable")[:k]]] = True
    if positives:
        sel |= pos
    assert sel.sum() == neg.shape[0] * k + (pos.sum() if positives else 0)
    hpr = d.components["nsd"].hparams
    want_logit = (
        hpr["logit_weight"] * hpr["beta"] * binary_kl_np(zs[sel], zt[sel], hpr["temperature"]).sum() / sel.sum()
    )
    bs, bt = flat_np(s.box_regs, a), flat_np(t.box_regs, a)
    want_box = hpr["box_weight"] * np.abs(bs[sel] - bt[sel]).sum() / (sel.sum() * info.box_dim)
    assert float(terms["nsd.logit"]) == pytest.approx(want_logit, rel=2e-5)
    assert float(terms["nsd.box"]) == pytest.approx(want_box, rel=2e-5)
    # the selection changes the value: the same outputs under the teacher's hard negatives, positives off
    base = build_distiller({"nsd": {**hp, "ncs": "topk", "positives": False}}, info, info)
    assert float(base(s, t, make_targets(), epoch=5.0)["nsd.logit"]) != pytest.approx(want_logit, rel=1e-3)
