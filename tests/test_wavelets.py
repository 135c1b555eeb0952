"""The differentiable DWT against PyWavelets and against the boundary convention written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from rkd.distill.wavelets import coefficient_centres, dwt2, dwt2_stacked, dwt_filters, dwt_output_size

BASES = ["haar", "db2", "db4", "sym4", "coif1", "bior2.2", "rbio3.1"]
SIZES = [(8, 8), (7, 9), (5, 12), (1, 3)]


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("size", SIZES)
def test_dwt2_matches_pywt_zero_mode(name: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(10 * BASES.index(name) + SIZES.index(size))
    x = rng.standard_normal((2, 3, *size))
    ca, (ch, cv, cd) = pywt.dwt2(x, name, mode="zero")  # transforms the last two axes
    got = dwt2(torch.from_numpy(x), name)
    for g, ref in zip(got, (ca, ch, cv, cd)):
        assert g.dtype == torch.float64
        assert tuple(g.shape) == ref.shape
        np.testing.assert_allclose(g.numpy(), ref, rtol=0, atol=1e-12)


def _dwt1_by_hand(x: np.ndarray, f: list[float]) -> np.ndarray:
    """The stated convention: y[k] = sum_j f[j] x[2k+1-j], x = 0 outside [0, N), k < (N+L-1)//2."""
    n, length = len(x), len(f)
    y = np.zeros((n + length - 1) // 2)
    for k in range(len(y)):
        for j in range(length):
            i = 2 * k + 1 - j
            if 0 <= i < n:
                y[k] += f[j] * x[i]
    return y


@pytest.mark.parametrize("name", ["haar", "db2", "bior2.2"])
def test_boundary_convention_written_out(name: str) -> None:
    wav = pywt.Wavelet(name)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6))
    rows = lambda a, f: np.stack([_dwt1_by_hand(r, f) for r in a])  # noqa: E731  (along W)
    cols = lambda a, f: rows(a.T, f).T  # noqa: E731  (along H)
    lo, hi = wav.dec_lo, wav.dec_hi
    expected = [rows(cols(x, lo), lo), rows(cols(x, hi), lo), rows(cols(x, lo), hi), rows(cols(x, hi), hi)]
    got = dwt2(torch.from_numpy(x)[None, None], name)
    for g, e in zip(got, expected):  # LL, LH (high along H), HL (high along W), HH
        np.testing.assert_allclose(g[0, 0].numpy(), e, atol=1e-12)
    assert dwt_output_size(5, name) == pywt.dwt_coeff_len(5, wav.dec_len, "zero")


def test_haar_bands_of_a_ramp() -> None:
    # a ramp along W has no horizontal-edge (LH) content and a constant HL response
    x = torch.arange(8.0).repeat(8, 1)[None, None]
    ll, lh, hl, hh = dwt2(x, "haar")
    assert lh.abs().max() == 0 and hh.abs().max() == 0
    assert torch.allclose(hl, torch.full_like(hl, -1.0))  # (x0 - x1) / sqrt2 * sqrt2 = -1 per pair


def test_coefficient_centres() -> None:
    # Haar coefficient k covers cells 2k, 2k+1 -> centre 2k+1; db2 (L=4) covers 2k-2..2k+1 -> centre 2k
    assert coefficient_centres(6, "haar").tolist() == [1.0, 3.0, 5.0]
    assert coefficient_centres(6, "db2").tolist() == [0.0, 2.0, 4.0, 6.0]


def test_gradcheck_and_filter_cache() -> None:
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dwt2(t, "db2"), (x,))
    assert dwt_filters("sym4", torch.float32) is dwt_filters("sym4", torch.float32)
    assert dwt_filters("sym4", torch.float32) is not dwt_filters("sym4", torch.float64)


@pytest.mark.parametrize("name", ["haar", "db2"])
@pytest.mark.parametrize("size", [(6, 8), (5, 6)])  # Haar on even sizes takes the 2 x 2 block path
def test_stacked_bands_any_memory_layout_and_gradients(name: str, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    stacked = dwt2_stacked(x, name)
    assert stacked.shape == (2, 3, 4, dwt_output_size(size[0], name), dwt_output_size(size[1], name))
    for band, single in zip(stacked.unbind(2), dwt2(x, name)):
        assert torch.equal(band, single)
    # channels-last and non-contiguous inputs give the same bands
    assert torch.allclose(dwt2_stacked(x.contiguous(memory_format=torch.channels_last), name), stacked, atol=1e-12)
    wide = torch.randn(2, 3, size[0], 2 * size[1], dtype=torch.float64)[..., ::2]
    assert torch.allclose(dwt2_stacked(wide, name), dwt2_stacked(wide.contiguous(), name), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: dwt2_stacked(t, name), (x,))


def test_filters_built_in_inference_mode_still_support_autograd() -> None:
    with torch.inference_mode():
        dwt2(torch.randn(1, 1, 4, 4, dtype=torch.float16), "db3")  # first call caches the filters
    x = torch.randn(1, 1, 4, 4, dtype=torch.float16, requires_grad=True)
    dwt2(x, "db3")[0].float().sum().backward()
    assert x.grad is not None


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown discrete wavelet 'morl'"):
        dwt2(torch.zeros(1, 1, 4, 4), "morl")
    with pytest.raises(ValueError, match="unknown discrete wavelet 'nope'"):
        dwt2(torch.zeros(1, 1, 4, 4), "nope")
    with pytest.raises(ValueError, match="only mode='zero'"):
        dwt2(torch.zeros(1, 1, 4, 4), "haar", mode="symmetric")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dwt2(torch.zeros(4, 4), "haar")
