"""Classification KD baselines (Hinton, DKD, FitNet, AT) against float64 references, and the registry."""

from __future__ import annotations

import pytest
import torch

from rkd.distill import CLASSIFIER_KD_METHODS, build_distiller, validate_methods
from rkd.distill.base import KD_METHODS
from rkd.distill.classification.dkd import dkd_loss, nckd, tckd
from rkd.errors import SpecError
from rkd.outputs import ClassifierInfo, ClassifierOutput

K = 6
S_INFO = ClassifierInfo(level_channels=(4, 6, 8), strides=(8, 16, 32), num_classes=K)
T_INFO = ClassifierInfo(level_channels=(5, 7, 9), strides=(8, 16, 32), num_classes=K)


def softmax64(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(1)


def outputs(info: ClassifierInfo, b: int = 3, seed: int = 0) -> ClassifierOutput:
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(b, c, 32 // s * 2, 32 // s * 2, generator=g, dtype=torch.float64)
        for c, s in zip(info.level_channels, info.strides)
    ]
    return ClassifierOutput(
        features=feats,
        pooled=feats[-1].mean((2, 3)),
        logits=3 * torch.randn(b, info.num_classes, generator=g, dtype=torch.float64),
    )


def dkd_reference(zs, zt, y, t):
    """TCKD and NCKD per sample from the definitions of DKD eq. (1)-(2), and the full KL."""
    ps, pt = softmax64(zs / t), softmax64(zt / t)
    rows = torch.arange(len(y))
    bs = torch.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = torch.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    keep = torch.ones_like(ps, dtype=torch.bool)
    keep[rows, y] = False
    hat_s = ps[keep].view(len(y), -1) / (1 - ps[rows, y])[:, None]  # p^ over the non-target classes
    hat_t = pt[keep].view(len(y), -1) / (1 - pt[rows, y])[:, None]
    return t * t * kl_rows(bt, bs), t * t * kl_rows(hat_t, hat_s), t * t * kl_rows(pt, ps), pt[rows, y]


def test_dkd_parts_match_the_definitions_and_the_kl_identity():
    torch.manual_seed(0)
    zs, zt = 2 * torch.randn(8, K, dtype=torch.float64), 2 * torch.randn(8, K, dtype=torch.float64)
    y = torch.randint(0, K, (8,))
    for t in (1.0, 4.0):
        ref_t, ref_n, ref_kl, p_target = dkd_reference(zs, zt, y, t)
        got_t, got_n = tckd(zs, zt, y, t), nckd(zs, zt, y, t)
        assert torch.allclose(got_t, ref_t, rtol=1e-9, atol=1e-12)
        assert torch.allclose(got_n, ref_n, rtol=1e-9, atol=1e-12)
        # DKD eq. (2): KD = TCKD + (1 - p_t^T) NCKD, so TCKD + NCKD equals KD only with that factor.
        assert torch.allclose(got_t + (1 - p_target) * got_n, ref_kl, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(got_t + got_n, ref_kl, rtol=1e-3)
        a, b = dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=t)
        assert torch.allclose(a, ref_t.mean(), rtol=1e-9) and torch.allclose(b, 8 * ref_n.mean(), rtol=1e-9)
    same_t, same_n = dkd_loss(zs, zs.clone(), y, 1.0, 8.0, 4.0)
    assert abs(float(same_t)) < 1e-12 and abs(float(same_n)) < 1e-12


def test_dkd_is_stable_for_confident_logits():
    z = torch.tensor([[60.0, 0.0, 0.0], [0.0, -60.0, 0.0]])
    t = tckd(z, z.flip(0), torch.tensor([0, 1]), 1.0)
    assert torch.isfinite(t).all() and (t > 0).all()


def test_dkd_component_defaults_and_warmup():
    d = build_distiller({"dkd": {"warmup_epochs": 4}}, S_INFO, T_INFO)
    assert d.hparams["dkd"] == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 4.0}
    s, t = outputs(S_INFO, seed=1), outputs(T_INFO, seed=2)
    y = torch.tensor([0, 5, 3])
    ref_t, ref_n, _, _ = dkd_reference(s.logits, t.logits, y, 4.0)
    half = d(s, t, y, epoch=2.0)
    full = d(s, t, y, epoch=9.0)
    assert set(full) == {"dkd.tckd", "dkd.nckd"}
    assert torch.allclose(full["dkd.tckd"], ref_t.mean(), rtol=1e-9)
    assert torch.allclose(full["dkd.nckd"], 8 * ref_n.mean(), rtol=1e-9)
    assert torch.allclose(half["dkd.nckd"], 0.5 * full["dkd.nckd"], rtol=1e-12)


def test_hinton_matches_float64_reference():
    d = build_distiller({"hinton": {"temperature": 3.0, "weight": 0.5}}, S_INFO, T_INFO)
    s, t = outputs(S_INFO, seed=3), outputs(T_INFO, seed=4)
    got = d(s, t, torch.tensor([0, 1, 2]))["hinton.logits"]
    ref = 0.5 * 9.0 * kl_rows(softmax64(t.logits / 3), softmax64(s.logits / 3)).mean()
    assert torch.allclose(got, ref, rtol=1e-10)
    assert float(d(s, s, torch.tensor([0, 1, 2]))["hinton.logits"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("level,index", [("first", 0), ("middle", 1), ("last", 2)])
def test_fitnet_matches_float64_reference(level, index):
    d = build_distiller({"fitnet": {"level": level, "weight": 2.0}}, S_INFO, T_INFO).double()
    s, t = outputs(S_INFO, seed=5), outputs(T_INFO, seed=6)
    got = d(s, t, torch.tensor([0, 1, 2]))["fitnet.feat"]
    conv = d.components["fitnet"].regressor
    w, bias = conv.weight[:, :, 0, 0], conv.bias
    adapted = torch.einsum("oc,bchw->bohw", w, s.features[index]) + bias.view(1, -1, 1, 1)
    ref = 2.0 * ((adapted - t.features[index]) ** 2).mean()
    assert torch.allclose(got, ref, rtol=1e-10)


def test_at_matches_float64_reference():
    d = build_distiller({"at": {}}, S_INFO, T_INFO)
    s, t = outputs(S_INFO, seed=7), outputs(T_INFO, seed=8)
    got = d(s, t, torch.tensor([0, 1, 2]))["at.attn"]
    ref = 0.0
    for fs, ft in zip(s.features, t.features):
        qs, qt = (fs**2).mean(1).flatten(1), (ft**2).mean(1).flatten(1)
        qs, qt = qs / qs.norm(dim=1, keepdim=True), qt / qt.norm(dim=1, keepdim=True)
        ref = ref + ((qs - qt) ** 2).mean()
    assert torch.allclose(got, 1000.0 / 2 * ref, rtol=1e-10)


def test_registry_is_separate_and_checks_models():
    assert set(CLASSIFIER_KD_METHODS) == {"hinton", "dkd", "fitnet", "at", "sskd"}
    assert CLASSIFIER_KD_METHODS["hinton"] is not KD_METHODS["hinton"]
    for name in ("hinton", "dkd", "fitnet", "at"):
        with pytest.raises(SpecError) as err:
            build_distiller({name: {}}, S_INFO, None)
        assert str(err.value) == (
            f"{name}: KD method {name!r} distils a teacher's outputs, but no teacher was given; "
            "train or name a teacher, or use a self-distillation method (sskd)"
        )
    other = ClassifierInfo(level_channels=(5, 7, 9), strides=(8, 16, 32), num_classes=K + 1)
    with pytest.raises(SpecError, match=r"hinton: student and teacher disagree on the number of classes \(6 vs 7\)"):
        build_distiller({"hinton": {}}, S_INFO, other)
    coarse = ClassifierInfo(level_channels=(5, 7, 9), strides=(16, 32, 64), num_classes=K)
    with pytest.raises(SpecError, match="at: KD method 'at' compares attention maps location by location"):
        build_distiller({"at": {}}, S_INFO, coarse)
    with pytest.raises(SpecError, match="fitnet: KD method 'fitnet' compares the last level location by location"):
        build_distiller({"fitnet": {"level": "last"}}, S_INFO, coarse)
    with pytest.raises(SpecError, match="nsd: unknown classification KD method"):
        build_distiller({"nsd": {}}, S_INFO, T_INFO)
    with pytest.raises(SpecError, match="dkd.beta: expected a number, got 'x'"):
        build_distiller({"dkd": {"beta": "x"}}, S_INFO, T_INFO)


def test_a_teacher_that_resizes_its_input_pairs_with_logit_methods_only():
    # Same strides, but the teacher's maps lie on the grid of a 224 px input: location-by-location
    # methods are refused before training, logit methods (and SSKD's logit-only teacher branch) built.
    upsampled = ClassifierInfo(level_channels=(5, 7, 9), strides=(8, 16, 32), num_classes=K, resize_to=224)
    with pytest.raises(
        SpecError,
        match=r"at: KD method 'at' compares attention maps location by location, but the student sees the input "
        r"as given and the teacher its input resized to 224 px: give both the same model.resize_to",
    ):
        build_distiller({"at": {}}, S_INFO, upsampled)
    with pytest.raises(
        SpecError,
        match="fitnet: KD method 'fitnet' compares the last level location by location, but the student sees the input as given",
    ):
        build_distiller({"fitnet": {"level": "last"}}, S_INFO, upsampled)
    distiller = build_distiller({"hinton": {}, "dkd": {}, "sskd": {"teacher_weight": 1.0}}, S_INFO, upsampled)
    assert sorted(distiller.components) == ["dkd", "hinton", "sskd"]
    same = ClassifierInfo(level_channels=(4, 6, 8), strides=(8, 16, 32), num_classes=K, resize_to=224)
    build_distiller({"at": {}}, same, upsampled)  # both resized alike: one grid


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_default_means_the_same_in_a_spec_a_space_and_a_component_built_in_code(task: str) -> None:
    """``weight: default`` passes a spec's and a search space's validation; a component given it in code
    takes the same value (it used to raise ``expected a number`` in the constructor)."""
    from rkd.distill import methods_of
    from rkd.outputs import DetectorInfo
    from rkd.search.space import compile_space

    registry = methods_of(task)
    compile_space({"methods": {"hinton": {"weight": "default"}}}, "space.yaml", registry=registry)
    resolved = validate_methods({"hinton": {"weight": "default"}}, task=task)["hinton"]
    info = (
        S_INFO
        if task == "classification"
        else DetectorInfo(level_channels=(8, 8), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
    )
    component = registry["hinton"](info, info, weight="default")
    assert component.hparams == resolved and resolved["weight"] == registry["hinton"].params["weight"].default
