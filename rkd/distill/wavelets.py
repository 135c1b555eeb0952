"""A differentiable first-order 2-D discrete wavelet transform for any PyWavelets basis.

The analysis filters come from ``pywt.Wavelet(name).dec_lo`` / ``dec_hi``; the
transform is applied as a stride-2 depthwise convolution with the four
separable kernels (one per band), so gradients flow through it and it runs on
any device. Filters are cached per ``(name, dtype, device)``.

Boundary convention (identical to ``pywt.dwt2(x, name, mode="zero")``): the
signal is extended with zeros on both sides and each 1-D pass computes
``y[k] = sum_j f[j] * x[2k + 1 - j]`` for ``k = 0 .. floor((N + L - 1) / 2) - 1``
(``f`` a filter of even length ``L``, ``x[i] = 0`` outside ``[0, N)``). So an
axis of length ``N`` yields ``floor((N + L - 1) / 2)`` coefficients and
coefficient ``k`` is centred on input index ``2k + 1.5 - L / 2``, i.e. at ``2k + 2 - L / 2``
when cell ``i`` spans ``[i, i + 1)`` (see :func:`coefficient_centres`).

Band order and names follow pywt's ``(cA, (cH, cV, cD))``:

* ``LL`` low-pass along both axes (pywt ``cA``),
* ``LH`` high-pass along H (rows, y), low-pass along W (pywt ``cH``, horizontal edges),
* ``HL`` low-pass along H, high-pass along W (pywt ``cV``, vertical edges),
* ``HH`` high-pass along both (pywt ``cD``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    import pywt

__all__ = ["dwt2", "dwt2_stacked", "dwt_filters", "dwt_output_size", "coefficient_centres", "check_wavelet"]


def check_wavelet(name: str) -> pywt.Wavelet:
    """The discrete ``pywt.Wavelet`` called ``name``, or ``ValueError`` naming the valid ones.

    PyWavelets is imported here, when a wavelet is first asked for: ``import rkd.distill`` needs torch alone.

    >>> check_wavelet("db2").dec_len
    4
    """
    pywt: Any = _pywt()
    if name not in pywt.wavelist(kind="discrete"):
        raise ValueError(
            f"unknown discrete wavelet {name!r}; use a PyWavelets name such as haar, db2, db4, sym4, coif1, bior2.2"
        )
    return pywt.Wavelet(name)


def _pywt() -> Any:
    try:
        import pywt
    except ImportError:
        raise ImportError("DS2D2's wavelet transform needs PyWavelets: pip install PyWavelets") from None
    return pywt


def dwt_output_size(n: int, wavelet: str) -> int:
    """Coefficients per axis for an input of length ``n`` (mode 'zero'), as ``pywt.dwt_coeff_len``.

    >>> dwt_output_size(7, "haar"), dwt_output_size(8, "db2")
    (4, 5)
    """
    length = check_wavelet(wavelet).dec_len
    return (n + length - 1) // 2


def coefficient_centres(n: int, wavelet: str) -> Tensor:
    """Position (in input cells, cell ``i`` spanning ``[i, i+1)``) each coefficient is centred on.

    Coefficient ``k`` mixes inputs ``2k + 1 - j`` for ``j < L``, whose cell centres
    ``i + 0.5`` average to ``2k + 2 - L / 2``; for Haar that is ``2k + 1``, the
    middle of the cell pair ``(2k, 2k+1)``.

    >>> coefficient_centres(4, "haar").tolist()
    [1.0, 3.0]
    """
    length = check_wavelet(wavelet).dec_len
    k = torch.arange(dwt_output_size(n, wavelet), dtype=torch.float64)
    return 2 * k + 2 - length / 2


@functools.lru_cache(maxsize=64)
def _filters(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    wav = check_wavelet(name)
    # Inside inference_mode the cached tensor would be an inference tensor that autograd
    # later refuses to save; build it as a normal tensor whatever the caller's mode.
    with torch.inference_mode(False), torch.no_grad():
        lo = torch.tensor(wav.dec_lo[::-1], dtype=torch.float64)  # reversed: conv2d correlates
        hi = torch.tensor(wav.dec_hi[::-1], dtype=torch.float64)
        # kernel[band, 0, i, j] = row_filter[i] * col_filter[j]; rows run along H, columns along W
        pairs = ((lo, lo), (hi, lo), (lo, hi), (hi, hi))  # LL, LH, HL, HH
        kernel = torch.stack([torch.outer(r, c) for r, c in pairs]).unsqueeze(1)
        kernel = kernel.to(dtype=dtype, device=device)
    return kernel, wav.dec_len


def dwt_filters(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The cached ``(4, 1, L, L)`` correlation kernels (LL, LH, HL, HH) of wavelet ``name``.

    >>> k = dwt_filters("haar", torch.float64)
    >>> k.shape, round(float(k[0].sum()), 6)
    (torch.Size([4, 1, 2, 2]), 2.0)
    """
    return _filters(name, dtype, torch.device(device))[0]


def dwt2(x: Tensor, wavelet: str = "haar", mode: str = "zero") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First-order 2-D DWT of ``x (B, C, H, W)`` -> ``(LL, LH, HL, HH)``, each ``(B, C, H', W')``.

    ``H' = floor((H + L - 1) / 2)`` (likewise ``W'``), matching ``pywt.dwt2(..., mode="zero")``
    value for value; only the zero boundary mode is implemented. The bands are views of
    :func:`dwt2_stacked`'s output.

    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> ll, lh, hl, hh = dwt2(x, "haar")
    >>> ll[0, 0].tolist(), hh.abs().max().item()
    ([[5.0, 9.0], [21.0, 25.0]], 0.0)
    """
    ll, lh, hl, hh = dwt2_stacked(x, wavelet, mode).unbind(2)
    return ll, lh, hl, hh


def dwt2_stacked(x: Tensor, wavelet: str = "haar", mode: str = "zero") -> Tensor:
    """:func:`dwt2` with the bands stacked: ``(B, C, 4, H', W')`` in the order LL, LH, HL, HH.

    Losses over several bands read one tensor, so their backward accumulates into one
    gradient instead of zero-filling a full-size gradient per band.

    >>> dwt2_stacked(torch.ones(2, 3, 4, 6), "db2").shape
    torch.Size([2, 3, 4, 3, 4])
    """
    if mode != "zero":
        raise ValueError(f"dwt2 implements only mode='zero', got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"dwt2 expects (B, C, H, W), got shape {tuple(x.shape)}")
    kernel, length = _filters(wavelet, x.dtype, x.device)
    b, c, h, w = x.shape
    if length == 2 and h % 2 == 0 and w % 2 == 0:
        # Haar-length filters on even sizes: each coefficient mixes one 2 x 2 block, so the
        # transform is a 4 x 4 matrix on a view of the blocks - no padding, no convolution
        # (forward + backward ~25% faster than the depthwise conv on the CPU).
        blocks = x.reshape(b, c, h // 2, 2, w // 2, 2)
        return torch.einsum("kij,bchiwj->bckhw", kernel.view(4, 2, 2), blocks)
    # Zero padding by L-2 before and L-1 after realises y[k] = sum_j f[j] x[2k+1-j] with zeros
    # outside; the stride-2 conv never reaches the last padded row of an even size, so there
    # the padding is symmetric and the conv pads by itself (no padded copy of x, forward or
    # backward).
    if h % 2 == 0 and w % 2 == 0:
        padded, conv_pad = x, length - 2
    else:
        padded, conv_pad = F.pad(x, (length - 2, length - 1, length - 2, length - 1)), 0
    if length == 2:
        # odd sizes: a depthwise conv over (B, C) is about twice as fast forward and backward on
        # the CPU as one conv over B*C single-channel images
        out = F.conv2d(padded, kernel.repeat(c, 1, 1, 1), stride=2, padding=conv_pad, groups=c)
    else:
        # longer filters: the single-channel form is the faster one
        out = F.conv2d(padded.reshape(b * c, 1, *padded.shape[-2:]), kernel, stride=2, padding=conv_pad)
    return out.reshape(b, c, 4, out.shape[-2], out.shape[-1])
