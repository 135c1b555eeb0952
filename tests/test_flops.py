"""FLOPs counting against hand-counted multiply-accumulates (FLOPs = 2 x MACs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rkd.models import build_detector, count_flops


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


def test_small_convnet_against_hand_count():
    # c1: 32x32 outputs x 8 channels x (3 in x 3x3) MACs each
    c1 = 32 * 32 * 8 * (3 * 9)
    # c2 (stride 2, 2 groups): 16x16 outputs x 16 channels x (8/2 in x 3x3)
    c2 = 16 * 16 * 16 * (4 * 9)
    fc = 4096 * 10
    macs = c1 + c2 + fc
    model = SmallNet()
    rep = count_flops(model, 32)
    assert round(rep.gflops * 1e9) == 2 * macs
    assert rep.params == (8 * 27 + 8) + (16 * 36 + 16) + (4096 * 10 + 10)
    assert round(count_flops(model, 32, batch=3).gflops * 1e9) == 3 * 2 * macs


class Spectral(nn.Module):
    def forward(self, x):
        spec = torch.fft.rfft2(x)  # r2c over the last two dims
        spec = torch.fft.fft(spec, dim=1)  # c2c over the channel dim
        return torch.fft.irfft2(spec, s=x.shape[-2:])  # c2r back


def test_fft_ops_are_counted():
    model = Spectral()
    b, c, s = 1, 3, 16
    n2d = s * s  # points per 2-D signal
    r2c = 5 * n2d * math.log2(n2d) * (b * c)
    # the c2c runs on the onesided spectrum (16 x 9) along channels: 3 points per signal
    c2c = int(5 * c * math.log2(c) * (b * s * (s // 2 + 1)))
    c2r = 5 * n2d * math.log2(n2d) * (b * c)
    rep = count_flops(model, s)
    assert rep.params == 0
    assert round(rep.gflops * 1e9) == round(r2c + c2c + c2r)


def test_detector_flops_grow_with_width_and_restore_mode():
    small = build_detector({"backbone": {"width": 0.25}, "neck": {"channels": 32}}, num_classes=3)
    large = build_detector({"backbone": {"width": 1.0}, "neck": {"channels": 32}}, num_classes=3)
    small.train()
    fs, fl = count_flops(small, 128), count_flops(large, 128)
    assert small.training
    assert 0 < fs.gflops < fl.gflops and fs.params < fl.params
    # stride-8 map is 16x16; its 3x3 stem conv alone is (64x64 out) x 8 ch x 27 MACs: a lower bound
    assert fs.gflops * 1e9 > 2 * 64 * 64 * 8 * 27
    # FLOPs scale with the pixel count for a fully convolutional net
    assert count_flops(small, 256).gflops == pytest.approx(fs.gflops * 4, rel=1e-12)


def test_detector_head_flops_hand_count():
    """Only the head changes between these two models, so the FLOP difference is the head's, by hand."""
    base = {"backbone": {"width": 0.25}, "neck": {"channels": 16}}
    a = build_detector({**base, "head": {"convs": 1}}, num_classes=2)
    b = build_detector({**base, "head": {"convs": 3}}, num_classes=2)
    s = 128
    locations = sum((s // st) ** 2 for st in (8, 16, 32))
    # two extra 16->16 3x3 convs in each of the 2 towers, at every level
    extra_macs = 2 * 2 * locations * 16 * (16 * 9)
    diff = count_flops(b, s).gflops - count_flops(a, s).gflops
    assert round(diff * 1e9) == 2 * extra_macs
