"""FLOPs and parameter counts of a model's inference forward pass.

Counts come from :class:`torch.utils.flop_counter.FlopCounterMode`, which
charges 2 FLOPs per multiply-accumulate of convolutions and matrix products
(so GFLOPs = 2 x GMACs) and ignores cheap elementwise ops. FFTs, which
spectral KD parts use, are charged ``5 N log2 N`` per transformed signal of
``N`` points (the classic radix-2 count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


@dataclass(frozen=True)
class FlopsReport:
    gflops: float  # 1e9 FLOPs of one forward pass of the whole batch
    params: int


def _fft_flops(in_shape, dim, out_shape, signal_shape) -> int:
    n = math.prod(signal_shape[d] for d in dim)
    if n <= 1:
        return 0
    signals = math.prod(in_shape) // math.prod(in_shape[d] for d in dim)
    return int(5 * n * math.log2(n) * signals)


def _fft_r2c_flop(self_shape, dim, normalization, onesided, *args, out_shape=None, **kwargs) -> int:
    return _fft_flops(self_shape, dim, out_shape, self_shape)


def _fft_c2c_flop(self_shape, dim, normalization, forward, *args, out_shape=None, **kwargs) -> int:
    return _fft_flops(self_shape, dim, out_shape, self_shape)


def _fft_c2r_flop(self_shape, dim, normalization, last_dim_size, *args, out_shape=None, **kwargs) -> int:
    # The signal length is that of the real output (the input holds only the onesided half).
    return _fft_flops(out_shape, dim, out_shape, out_shape)


FFT_FORMULAS = {aten._fft_r2c: _fft_r2c_flop, aten._fft_c2c: _fft_c2c_flop, aten._fft_c2r: _fft_c2r_flop}


def count_flops(model: nn.Module, input_size: int, batch: int = 1) -> FlopsReport:
    """FLOPs of ``model(images)`` for a ``(batch, 3, input_size, input_size)`` input, in eval mode.

    Any module taking an image batch works: detectors (one- and two-stage) and
    classifiers alike. They are called without targets or labels, so neither
    assignment, losses nor decoding are counted (a two-stage detector's proposal
    selection and RoI head are part of its forward and are counted). The model's train/eval mode is restored afterwards.

    >>> count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), 4)  # 2 * (4*4 out px) * 8 * 3*3*3
    FlopsReport(gflops=6.912e-06, params=216)
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    images = torch.randn(batch, 3, input_size, input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=FFT_FORMULAS)
        with torch.no_grad(), counter:
            model(images)
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return FlopsReport(gflops=counter.get_total_flops() / 1e9, params=params)
