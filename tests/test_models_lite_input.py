"""EfficientNet-Lite backbones convert rkd's ImageNet-normalised input to the [-1, 1] their weights expect."""

from __future__ import annotations

import torch

import rkd.data.dataset
import rkd.deploy.export
import rkd.models.efficientnet_lite
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.models import BACKBONES, build_detector
from rkd.models.efficientnet_lite import (
    EfficientNetLite,
    load_lukemelas_checkpoint,
    pretrained_checkpoint,
)


def test_one_definition_of_the_input_statistics():
    # the published ImageNet statistics, used by the data pipeline, the backbones and the export card alike
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    for module in (rkd.data.dataset, rkd.models.efficientnet_lite):
        assert getattr(module, "MEAN", IMAGENET_MEAN) is IMAGENET_MEAN
        assert getattr(module, "STD", IMAGENET_STD) is IMAGENET_STD
    assert rkd.models.efficientnet_lite.IMAGENET_MEAN is IMAGENET_MEAN
    assert rkd.deploy.export.PIXEL_MEAN is IMAGENET_MEAN and rkd.deploy.export.PIXEL_STD is IMAGENET_STD


def test_buffers_hold_the_exact_affine_and_are_not_saved():
    net = BACKBONES["efficientnet_lite0"]()
    # hand values: 2 * std and 2 * mean - 1
    assert torch.allclose(net.input_scale.flatten().double(), torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64))
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)
    assert torch.allclose(net.input_shift.flatten().double(), shift)
    assert not any("input_" in k for k in net.state_dict())
    # other families are untouched
    assert not hasattr(BACKBONES["mobilenet_v2"](), "input_scale")


def test_pretrained_backbone_sees_minus_one_to_one_float64_reference():
    """From uint8 pixels: the backbone on ImageNet-normalised input == the original network on pixel/127.5 - 1."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.float64)
    imagenet = (pixels / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    minus_one_one = pixels / 127.5 - 1

    ref = EfficientNetLite(0)
    load_lukemelas_checkpoint(ref, pretrained_checkpoint(0))
    ref = ref.double().eval()
    with torch.no_grad():
        x = ref.stem(minus_one_one)
        wanted = []
        for i, block in enumerate(ref.blocks):
            x = block(x)
            if i in (4, 10, 15):  # last blocks of the stride 8, 16, 32 stages (rows of 1, 2, 2, 3, 3, 4, 1 blocks)
                wanted.append(x)

    det = build_detector({"backbone": {"name": "efficientnet_lite0", "pretrained": True}}, num_classes=2)
    backbone = det.backbone.eval()
    with torch.no_grad():
        got64 = backbone.double()(imagenet)
        got32 = backbone.float()(imagenet.float())
    for g64, g32, w in zip(got64, got32, wanted):
        assert g64.shape == w.shape
        # float64 forward: off only by the float32 storage of the affine constants (~3e-8 relative)
        assert torch.allclose(g64, w, rtol=0, atol=1e-6 * w.abs().max().item())
        assert torch.allclose(g32.double(), w, rtol=0, atol=1e-4 * w.abs().max().item())
    # without the conversion the features would differ grossly (the weights would see other inputs)
    with torch.no_grad():
        raw = backbone.double().stages[0](imagenet)
        conv = backbone.double().stages[0](minus_one_one)
    assert (raw - conv).abs().max() > 0.1 * conv.abs().max()
