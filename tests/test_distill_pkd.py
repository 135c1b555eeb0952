"""PKD on degenerate levels: one location (batch 1 on a small tile) and constant channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import make_info, make_output, make_targets, np64

from rkd.distill import build_distiller
from rkd.distill.detection.pkd import pkd_loss

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def pkd_level_np(x: np.ndarray, y: np.ndarray) -> float:
    """MMRazor's per-level form: per channel, standardise the B*H*W values (unbiased std), 1/2 MSE."""
    c = x.shape[1]
    xs, ys = x.transpose(1, 0, 2, 3).reshape(c, -1), y.transpose(1, 0, 2, 3).reshape(c, -1)
    xs = (xs - xs.mean(1, keepdims=True)) / (xs.std(1, ddof=1, keepdims=True) + 1e-6)
    ys = (ys - ys.mean(1, keepdims=True)) / (ys.std(1, ddof=1, keepdims=True) + 1e-6)
    return float(((xs - ys) ** 2).mean() / 2)


def test_batch_one_with_a_one_by_one_level_is_finite():
    # 16 x 16 input, strides 8 and 16: a 2 x 2 level and a 1 x 1 level (one location with batch 1)
    s_info = make_info(channels=(6, 10), strides=(8, 16))
    t_info = make_info(channels=(12, 8), strides=(8, 16))
    s = make_output(s_info, image_size=(16, 16), batch=1, requires_grad=True)
    t = make_output(t_info, image_size=(16, 16), batch=1, gen=torch.Generator().manual_seed(3))
    assert s.features[1].shape[-2:] == (1, 1)
    d = build_distiller({"pkd": {}}, s_info, t_info)
    comp = d.components["pkd"]
    feat = d(s, t, make_targets(image_size=(16, 16), batch=1), epoch=0.0)["pkd.feat"]
    assert torch.isfinite(feat)
    # the single-location level has no correlation to match: it adds exactly 0, the 2 x 2 level its usual value
    want = 10.0 * pkd_level_np(np64(comp.adapters[0](s.features[0])), np64(t.features[0]))
    assert float(feat) == pytest.approx(want, rel=1e-5) and want > 0
    d.total({"pkd.feat": feat}).backward()
    grads = [x.grad for x in s.features] + [p.grad for p in comp.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert s.features[0].grad.abs().sum() > 0


def test_constant_channel_has_finite_gradients():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 3, 3, generator=gen)
    s[:, 1] = 0.5  # e.g. a dead channel: zero variance over the batch and space
    s.requires_grad_(True)
    t = torch.randn(2, 4, 3, 3, generator=gen)
    loss = pkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert float(loss) == pytest.approx(pkd_level_np(np64(s), np64(t)), rel=1e-5)
