"""Shared KD loss functions against float64 formulas computed with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rkd.distill.functional import bce_with_logits


def ref_bce(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``-(p log sigmoid(x) + (1 - p) log(1 - sigmoid(x)))`` in float64, with ``-log sigmoid(x) =
    log(1 + e^-x)`` as numpy's logaddexp(0, -x), exact in both tails."""
    return p * np.logaddexp(0.0, -x) + (1.0 - p) * np.logaddexp(0.0, x)


def test_bce_with_logits_matches_float64_formula_in_both_tails() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(5000, generator=gen) * 4, -torch.linspace(0, 85, 400), torch.linspace(0, 85, 400)])
    p = torch.cat([torch.rand(5000, generator=gen), torch.zeros(400), torch.ones(400)])
    got = bce_with_logits(x, p).double().numpy()
    ref = ref_bce(x.double().numpy(), p.double().numpy())
    # in general float32 rounding of max(x, 0) - p x bounds the error by a few ulps of |x|
    np.testing.assert_allclose(got[:5000], ref[:5000], rtol=0, atol=4e-7 * (1 + np.abs(ref[:5000]).max()))
    # relative precision down to ~1e-37 in the tails (p = 0, x -> -inf and p = 1, x -> +inf),
    # which are log1p(exp(-|x|)) alone: a naive log(1 + exp(-|x|)) rounds them to 0 below ~6e-8
    np.testing.assert_allclose(got[5000:], ref[5000:], rtol=2e-6, atol=0)
    assert got[5000 + 399] > 0 and got[-1] > 0


def test_bce_with_logits_gradients_and_broadcast_target() -> None:
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bce_with_logits, (x, p))
    xs = torch.randn(2, 5, requires_grad=True)
    target = torch.rand(1, 5)  # broadcasts over the rows
    bce_with_logits(xs, target).sum().backward()
    expected = torch.sigmoid(xs.detach()) - target
    torch.testing.assert_close(xs.grad, expected)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_bce_with_logits_agrees_with_torch(p: float) -> None:
    x = torch.linspace(-12, 12, 97)
    torch.testing.assert_close(
        bce_with_logits(x, torch.full_like(x, p)),
        torch.nn.functional.binary_cross_entropy_with_logits(x, torch.full_like(x, p), reduction="none"),
        rtol=1e-5,
        atol=1e-6,
    )
