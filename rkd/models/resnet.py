"""ResNet-18/34/50 backbones with a channel-width multiplier (torchvision's residual blocks)."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from rkd.models.backbones import StagedBackbone, register_backbone, scaled_channels

# blocks per stage, block type
RESNETS: dict[int, tuple[tuple[int, ...], type[nn.Module]]] = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
}


def _layer(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(StagedBackbone):
    """Stage 0: 7x7 stride-2 stem; stage 1: max-pool + layer1; stages 2-4: layer2-4.

    ``width`` scales every stage's channels (rounded to multiples of 8).
    """

    def __init__(self, depth: int, width: float = 1.0, out_indices: tuple[int, ...] = (2, 3, 4)) -> None:
        blocks, block = RESNETS[depth]
        stem = scaled_channels(64, width)
        stages: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        ]
        channels, inplanes = [stem], stem
        for i, n in enumerate(blocks):
            planes = scaled_channels(64 * 2**i, width)
            layer = _layer(block, inplanes, planes, n, stride=1 if i == 0 else 2)
            stages.append(nn.Sequential(nn.MaxPool2d(3, 2, 1), layer) if i == 0 else layer)
            inplanes = planes * block.expansion
            channels.append(inplanes)
        super().__init__(stages, channels, out_indices)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each residual branch so every block starts as the identity.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def _resnet(depth: int, width: float, pretrained: bool, out_indices: tuple[int, ...]) -> ResNet:
    if pretrained:
        raise ValueError(f"resnet{depth} has no offline pretrained weights; use backbone.weights: PATH")
    return ResNet(depth, width, tuple(out_indices))


@register_backbone("resnet18")
def resnet18(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return _resnet(18, width, pretrained, out_indices)


@register_backbone("resnet34")
def resnet34(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3)."""
    return _resnet(34, width, pretrained, out_indices)


@register_backbone("resnet50")
def resnet50(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)) -> ResNet:
    """ResNet-50 (bottleneck blocks 3-4-6-3, outputs 512/1024/2048 channels at strides 8/16/32).

    >>> resnet50().out_channels
    (512, 1024, 2048)
    """
    return _resnet(50, width, pretrained, out_indices)
