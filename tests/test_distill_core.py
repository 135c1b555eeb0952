"""Distiller core, FitNet and Hinton KD: values against float64 references, goldens, gradients, errors.

Regenerate the goldens (only when a loss definition deliberately changes) with
``python tests/test_distill_core.py --regen``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import make_info, make_output, make_targets, np64, set_conv_weights

from rkd.distill import KD_METHODS, Distiller, build_distiller, nonfinite_terms, validate_methods
from rkd.errors import SpecError
from rkd.outputs import DetectorOutput

# float(loss) on a term that requires grad is what these tests mean to do
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

GOLDEN = Path(__file__).parent / "fixtures" / "kd_golden_core.json"


# ----------------------------------------------------------------------------- float64 references


def ref_fitnet(student: DetectorOutput, teacher: DetectorOutput, adapters, weight: float) -> float:
    """L = weight / L * sum_l mean (t - (W s + b))^2, the 1x1 conv written as an einsum."""
    per_level = []
    for conv, fs, ft in zip(adapters, student.features, teacher.features):
        wmat = np64(conv.weight)[:, :, 0, 0]
        bias = np64(conv.bias)
        adapted = np.einsum("oc,bchw->bohw", wmat, np64(fs)) + bias[None, :, None, None]
        per_level.append(np.mean((np64(ft) - adapted) ** 2))
    return weight * float(np.mean(per_level))


def _per_anchor_logits(out: DetectorOutput) -> np.ndarray:
    """(total anchors, K) from (B, A*K, H, W) maps, grouping channels as a*K + k."""
    a, k = out.info.num_anchors, out.info.num_classes
    rows = []
    for m in out.cls_logits:
        x = np64(m)
        b, _, h, w = x.shape
        x = x.reshape(b, a, k, h, w).transpose(0, 3, 4, 1, 2).reshape(-1, k)
        rows.append(x)
    return np.concatenate(rows, 0)


def ref_hinton_sigmoid(student: DetectorOutput, teacher: DetectorOutput, weight: float, temp: float) -> float:
    zs, zt = _per_anchor_logits(student) / temp, _per_anchor_logits(teacher) / temp
    p = 1.0 / (1.0 + np.exp(-zt))
    q = 1.0 / (1.0 + np.exp(-zs))
    kl = p * np.log(p / q) + (1.0 - p) * np.log((1.0 - p) / (1.0 - q))  # binary KL per element
    return weight * temp**2 * float(kl.mean())


def ref_hinton_softmax(student: DetectorOutput, teacher: DetectorOutput, weight: float, temp: float) -> float:
    zs, zt = _per_anchor_logits(student) / temp, _per_anchor_logits(teacher) / temp
    p = np.exp(zt - zt.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(zs - zs.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    kl = (p * np.log(p / q)).sum(1)
    return weight * temp**2 * float(kl.mean())


# ----------------------------------------------------------------------------- golden cases


def _golden_case(name: str):
    """(distiller, student_out, teacher_out, targets, reference value) for a named golden case."""
    s_info = make_info(channels=(6, 10), num_anchors=2)
    t_info = make_info(channels=(12, 8), num_anchors=2)
    s = make_output(s_info, gen=torch.Generator().manual_seed(11))
    t = make_output(t_info, gen=torch.Generator().manual_seed(12))
    tg = make_targets()
    if name == "fitnet":
        d = build_distiller({"fitnet": {"weight": 0.7}}, s_info, t_info)
        set_conv_weights(d.components["fitnet"], 5)
        d.components["fitnet"].adapter_scale.done.fill_(True)  # these weights as set (see test_distill_adapters)
        ref = ref_fitnet(s, t, d.components["fitnet"].adapters, 0.7)
    elif name == "hinton_sigmoid":
        d = build_distiller({"hinton": {"weight": 1.3, "temperature": 3.0}}, s_info, t_info)
        ref = ref_hinton_sigmoid(s, t, 1.3, 3.0)
    elif name == "hinton_softmax":
        d = build_distiller({"hinton": {"weight": 0.6, "temperature": 4.0, "form": "softmax"}}, s_info, t_info)
        ref = ref_hinton_softmax(s, t, 0.6, 4.0)
    else:
        raise KeyError(name)
    return d, s, t, tg, ref


GOLDEN_CASES = ["fitnet", "hinton_sigmoid", "hinton_softmax"]


def _single_value(d: Distiller, s, t, tg) -> float:
    terms = d(s, t, tg, epoch=5.0)
    return float(d.total(terms))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_float64_reference(case):
    d, s, t, tg, ref = _golden_case(case)
    assert _single_value(d, s, t, tg) == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_golden(case):
    golden = json.loads(GOLDEN.read_text())
    d, s, t, tg, _ = _golden_case(case)
    assert _single_value(d, s, t, tg) == pytest.approx(golden[case], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_inputs_match_reference(seed):
    """Other shapes (one anchor, 4 levels, HBB) and other hyperparameters."""
    gen = torch.Generator().manual_seed(100 + seed)
    temp = float(1 + 3 * torch.rand((), generator=gen))
    s_info = make_info(channels=(4, 5, 6, 7), strides=(4, 8, 16, 32), num_classes=5, num_anchors=1, box_dim=4)
    t_info = make_info(channels=(9, 9, 9, 9), strides=(4, 8, 16, 32), num_classes=5, num_anchors=1, box_dim=4)
    s, t = make_output(s_info, image_size=(64, 32), gen=gen), make_output(t_info, image_size=(64, 32), gen=gen)
    tg = make_targets((64, 32))
    d = build_distiller({"fitnet": {"weight": 2.0}, "hinton": {"temperature": temp}}, s_info, t_info)
    terms = d(s, t, tg)
    want = ref_fitnet(s, t, d.components["fitnet"].adapters, 2.0)
    assert float(terms["fitnet.feat"]) == pytest.approx(want, rel=1e-5)
    assert float(terms["hinton.cls"]) == pytest.approx(ref_hinton_sigmoid(s, t, 1.0, temp), rel=1e-5)
    d2 = build_distiller({"hinton": {"temperature": temp, "form": "softmax", "weight": 0.25}}, s_info, t_info)
    assert float(d2(s, t, tg)["hinton.cls"]) == pytest.approx(ref_hinton_softmax(s, t, 0.25, temp), rel=1e-5)


def test_gradients_reach_student_and_adapters_never_teacher():
    s_info, t_info = make_info(channels=(6, 10)), make_info(channels=(12, 8))
    s = make_output(s_info, gen=torch.Generator().manual_seed(3), requires_grad=True)
    t = make_output(t_info, gen=torch.Generator().manual_seed(4), requires_grad=True)
    d = build_distiller({"fitnet": {}, "hinton": {"form": "softmax"}}, s_info, t_info)
    d.total(d(s, t, make_targets())).backward()
    for f in s.features + s.cls_logits:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for p in d.components["fitnet"].adapters.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for f in t.features + t.cls_logits + t.box_regs:
        assert f.grad is None


def test_fitnet_zero_when_student_equals_teacher_with_identity_adapter():
    info = make_info(channels=(6, 10))
    s = make_output(info, gen=torch.Generator().manual_seed(7))
    d = build_distiller({"fitnet": {"weight": 3.0}}, info, info)
    with torch.no_grad():
        for conv, c in zip(d.components["fitnet"].adapters, info.level_channels):
            conv.weight.copy_(torch.eye(c)[:, :, None, None])
            conv.bias.zero_()
    assert float(d(s, s, make_targets())["fitnet.feat"]) == 0.0
    # and not zero otherwise (the test above can fail)
    t = make_output(info, gen=torch.Generator().manual_seed(8))
    assert float(d(s, t, make_targets())["fitnet.feat"]) > 0.1


def test_hinton_zero_when_equal_in_both_forms():
    info = make_info()
    s = make_output(info, gen=torch.Generator().manual_seed(9))
    d = build_distiller({"hinton": {"form": "softmax", "temperature": 4.0}}, info, info)
    assert abs(float(d(s, s, make_targets())["hinton.cls"])) < 1e-6
    # sigmoid form at s == t: the binary KL is 0 (the teacher's entropy is not in the value), and so is its gradient
    s2 = make_output(info, gen=torch.Generator().manual_seed(9))
    d2 = build_distiller({"hinton": {"temperature": 2.0}}, info, info)
    zs = [m.detach().clone().requires_grad_(True) for m in s.cls_logits]
    s2.cls_logits = zs
    d2(s2, s, make_targets())["hinton.cls"].backward()
    assert max(float(g.grad.abs().max()) for g in zs) < 1e-7
    assert abs(float(d2(s2, s, make_targets())["hinton.cls"])) < 1e-6


def test_distiller_names_and_sums_terms():
    s_info, t_info = make_info(channels=(6, 10)), make_info(channels=(12, 8))
    s, t = make_output(s_info), make_output(t_info, gen=torch.Generator().manual_seed(5))
    d = build_distiller({"fitnet": {}, "hinton": {}}, s_info, t_info)
    terms = d(s, t, make_targets())
    assert sorted(terms) == ["fitnet.feat", "hinton.cls"]
    assert float(d.total(terms)) == pytest.approx(float(terms["fitnet.feat"]) + float(terms["hinton.cls"]), rel=1e-6)
    # weights scale the terms linearly
    d2 = build_distiller({"fitnet": {"weight": 2.0}, "hinton": {"weight": 0.5}}, s_info, t_info)
    d2.components["fitnet"].load_state_dict(d.components["fitnet"].state_dict())
    terms2 = d2(s, t, make_targets())
    assert float(terms2["fitnet.feat"]) == pytest.approx(2 * float(terms["fitnet.feat"]), rel=1e-6)
    assert float(terms2["hinton.cls"]) == pytest.approx(0.5 * float(terms["hinton.cls"]), rel=1e-6)
    assert d.hparams == {
        "fitnet": {"weight": 1.0, "adapter_init": "teacher_scale"},
        "hinton": {"weight": 1.0, "temperature": 2.0, "form": "sigmoid"},
    }


def test_empty_methods_is_no_kd():
    info = make_info()
    d = build_distiller({}, info, info)
    s = make_output(info)
    terms = d(s, s, make_targets())
    assert terms == {}
    assert float(d.total(terms)) == 0.0
    assert list(d.parameters()) == []
    assert validate_methods({}) == {} and validate_methods(None) == {}


def test_nonfinite_terms():
    terms = {
        "fitnet.feat": torch.tensor(1.0),
        "hinton.cls": torch.tensor(float("nan")),
        "x.y": torch.tensor(float("-inf")),
        "ok.z": torch.tensor(0.0),
    }
    assert nonfinite_terms(terms) == ["hinton.cls", "x.y"]
    assert nonfinite_terms({"a.b": torch.tensor(2.0)}) == []


def test_validate_fills_defaults_and_accepts_default_string():
    out = validate_methods({"fitnet": None, "hinton": {"temperature": "default", "form": "softmax", "weight": 2}})
    assert out == {
        "fitnet": {"weight": 1.0, "adapter_init": "teacher_scale"},
        "hinton": {"weight": 2.0, "temperature": 2.0, "form": "softmax"},
    }
    assert isinstance(out["hinton"]["weight"], float)


@pytest.mark.parametrize(
    "cfg, path, fragment",
    [
        ({"fitnett": {}}, "fitnett", "unknown KD method"),
        ({"fitnet": {"wieght": 1.0}}, "fitnet.wieght", "unknown parameter"),
        ({"hinton": {"temperature": "hot"}}, "hinton.temperature", "expected a number"),
        ({"hinton": {"form": "logsoftmax"}}, "hinton.form", "expected one of ['sigmoid', 'softmax']"),
        ({"hinton": {"weight": True}}, "hinton.weight", "expected a number"),
        ({"hinton": {"weight": float("nan")}}, "hinton.weight", "finite"),
        ({"fitnet": 3}, "fitnet", "expected a mapping"),
    ],
)
def test_spec_errors_name_the_path(cfg, path, fragment):
    info = make_info()
    for call in (lambda: validate_methods(cfg), lambda: build_distiller(cfg, info, info)):
        with pytest.raises(SpecError) as err:
            call()
        assert err.value.path == path
        assert fragment in err.value.message
        assert str(err.value).startswith(f"{path}: ")
    assert str(err.value.within("methods")).startswith(f"methods.{path}: ")


def test_incompatible_models_refused_at_build_time():
    s_info = make_info(strides=(8, 16))
    with pytest.raises(SpecError) as err:
        build_distiller({"fitnet": {}}, s_info, make_info(strides=(4, 8)))
    assert err.value.path == "fitnet" and "strides" in err.value.message
    with pytest.raises(SpecError) as err:
        build_distiller({"hinton": {}}, s_info, make_info(num_anchors=9))
    assert err.value.path == "hinton" and "anchors" in err.value.message
    with pytest.raises(SpecError) as err:
        build_distiller({"hinton": {}}, s_info, make_info(num_classes=7))
    assert err.value.path == "hinton" and "number of classes" in err.value.message


def test_check_compatible_angle_bins_requirement():
    from rkd.distill import KDComponent, check_compatible

    class NeedsBins(KDComponent):  # not registered: only the requirement is under test
        name = "needs_bins"
        requires = frozenset({"angle_bins"})

    check_compatible(NeedsBins, make_info(angle_bins=30), make_info(angle_bins=30))
    with pytest.raises(ValueError, match="angle classification branch .* which the teacher lacks"):
        check_compatible(NeedsBins, make_info(angle_bins=30), make_info(angle_bins=0))


def test_registry_has_core_methods():
    assert {"fitnet", "hinton"} <= set(KD_METHODS)
    for name in ("fitnet", "hinton"):
        cls = KD_METHODS[name]
        assert cls.name == name and "weight" in cls.params


if __name__ == "__main__" and "--regen" in sys.argv:
    from goldens import regenerate

    regenerate(GOLDEN, {case: _golden_case(case)[-1] for case in GOLDEN_CASES})  # the float64 references
