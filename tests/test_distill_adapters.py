"""Feature adapters start at the teacher's scale (rkd.distill.connectors.AdapterScaleInit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rkd.distill.connectors import AdapterScaleInit, conv_adapters
from rkd.distill.distiller import Distiller, build_distiller
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def _info(channels: int) -> DetectorInfo:
    return DetectorInfo(level_channels=(channels, channels), strides=(8, 16), num_classes=2, num_anchors=1, box_dim=5)


def _output(info: DetectorInfo, features: list[torch.Tensor]) -> DetectorOutput:
    # the pixel term reads the features and the grid only
    return DetectorOutput(info=info, features=features, cls_logits=[], box_regs=[], anchors=[], image_size=(128, 128))


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


def _features(channels: int, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(2, channels, s, s, generator=g) for s in (16, 8)]


def test_first_training_call_matches_the_teacher_rms_per_level_and_only_once():
    student, teacher = _features(8, 1.5, 0), _features(16, 9.0, 1)
    teacher[1] = teacher[1] * 0.5  # levels of different scale get different factors
    adapters = conv_adapters(_info(8), _info(16), kernel_size=3, init_std=1e-4)
    init = AdapterScaleInit("teacher_scale")
    init(adapters, student, teacher)
    for a, s, t in zip(adapters, student, teacher):
        assert _rms(a(s)) == pytest.approx(_rms(t), rel=1e-4)
    before = [p.clone() for p in adapters.parameters()]
    init(adapters, _features(8, 3.0, 2), teacher)  # a later step: no second rescale
    assert all(torch.equal(a, b) for a, b in zip(before, adapters.parameters()))
    state = init.state_dict()
    fresh = AdapterScaleInit("teacher_scale")
    fresh.load_state_dict(state)  # a resumed run keeps its trained adapters as they are
    assert bool(fresh.done)
    older = AdapterScaleInit("teacher_scale")
    older.load_state_dict({})  # KD parts saved before this init existed: their adapters are trained
    assert bool(older.done)


def test_plain_mode_and_eval_leave_the_adapters_alone():
    student, teacher = _features(8, 1.0, 0), _features(16, 9.0, 1)
    for init in (AdapterScaleInit("plain"), AdapterScaleInit("teacher_scale").eval()):
        adapters = conv_adapters(_info(8), _info(16))
        before = [p.clone() for p in adapters.parameters()]
        init(adapters, student, teacher)
        assert all(torch.equal(a, b) for a, b in zip(before, adapters.parameters()))
    with pytest.raises(ValueError, match="adapter_init: expected one of"):
        AdapterScaleInit("zeros")


def _imitate(adapter_init: str, steps: int = 60) -> float:
    """RMS of the student's features after ``steps`` Adam steps (lr 1e-3) of NSD's background imitation
    towards teacher features 6x larger: the student features are free parameters here."""
    torch.manual_seed(0)
    student_info, teacher_info = _info(8), _info(16)
    distiller = build_distiller(
        {"nsd": {"pixel": True, "logit": False, "box": False, "angle": False, "adapter_init": adapter_init}},
        student_info,
        teacher_info,
    )
    feats = [nn.Parameter(f) for f in _features(8, 1.5, 0)]
    teacher = _output(teacher_info, _features(16, 9.0, 1))
    targets = Targets([torch.zeros(0, 5)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (128, 128))
    opt = torch.optim.Adam([*feats, *distiller.parameters()], lr=1e-3)
    for _ in range(steps):
        loss = Distiller.total(distiller(_output(student_info, list(feats)), teacher, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max(_rms(f.detach()) / 1.5 for f in feats)


def test_scaled_adapters_do_not_inflate_the_student_features():
    # The released N(0, 1e-4^2) adapter can only reduce the imitation loss by growing the student's
    # features; scaled to the teacher at the first step, the adapter carries the scale instead.
    plain, scaled = _imitate("plain"), _imitate("teacher_scale")
    assert plain > 1.015  # measured 1.022 (30 steps: 1.008, 100: 1.043)
    assert scaled < 1.0  # measured 0.976: the features even shrink a little
