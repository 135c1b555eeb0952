"""The EfficientNet-Lite0 ImageNet weights are real: a linear probe on AID beats random features by far.

Features are the global average of the last stage (320 channels, stride 32) on
10 AID classes (the first 10 in name order; 20 train and 10 val images each, 128 px).
A ridge regression to one-hot labels (closed form, float64, standardised
features, lambda 100) classifies the val images. Measured on this subset (one
core, 2026-11): pretrained 0.81, random init 0.26 (chance 0.10); lambda from
1 to 1000 moves them within 0.67..0.83 and 0.24..0.26. The asserted margins
leave about 0.15 of slack on each side.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from aid_images import AID, load_aid

from rkd.models import BACKBONES


@torch.no_grad()
def pooled_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(chunk)[-1].mean(dim=(2, 3)) for chunk in images.split(50)]).double()


def ridge_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, lam: float = 100.0
) -> float:
    """Val accuracy of ridge regression to one-hot targets on standardised features (with a bias column)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = F.pad((train_x - mu) / sd, (0, 1), value=1.0)
    b = F.pad((val_x - mu) / sd, (0, 1), value=1.0)
    onehot = F.one_hot(train_y).double()
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ onehot)
    return ((b @ w).argmax(1) == val_y).double().mean().item()


def test_ridge_probe_separates_separable_features():
    # two clusters in 5-d: a working probe gets them all
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20, 5) + 4, torch.randn(20, 5) - 4]).double()
    y = torch.tensor([0] * 20 + [1] * 20)
    assert ridge_probe(x, y, x, y, lam=1.0) == 1.0


@pytest.mark.skipif(not AID.is_dir(), reason="shared AID data absent")
def test_pretrained_features_beat_random_init():
    classes = sorted(p.name for p in (AID / "train").iterdir())[:10]
    train_x, train_y = load_aid(classes, 20, "train", 128)
    val_x, val_y = load_aid(classes, 10, "val", 128)
    accuracy = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        net = BACKBONES["efficientnet_lite0"](pretrained=pretrained)
        accuracy[pretrained] = ridge_probe(pooled_features(net, train_x), train_y, pooled_features(net, val_x), val_y)
    assert accuracy[True] >= 0.65, accuracy
    assert accuracy[True] >= accuracy[False] + 0.35, accuracy
