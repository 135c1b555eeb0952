"""Backbone registry and the plain ``convnet`` family.

A backbone is an ``nn.Module`` whose forward maps images ``(B, 3, H, W)`` to a
list of feature maps, finest first, and which exposes ``out_channels`` and
``out_strides`` (one entry per returned map). Factories are registered by name
with :func:`register_backbone`; their keyword arguments (and defaults) are the
keys a spec may set under ``model.backbone``, so the spec validator learns new
families without being edited.
"""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# Widths for which ImageNet weights exist, per backbone (absent: none exist).
PRETRAINED_WIDTHS: dict[str, tuple[float, ...]] = {}


def register_backbone(name: str, pretrained_widths: tuple[float, ...] = ()):
    """Function decorator adding a backbone factory to :data:`BACKBONES` under ``name``.

    ``pretrained_widths`` lists the ``width`` values with ImageNet weights, so a
    spec asking for ``pretrained: true`` elsewhere is refused before building.
    """

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = factory
        PRETRAINED_WIDTHS[name] = tuple(pretrained_widths)
        return factory

    return add


def scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``).

    >>> scaled_channels(64, 0.5), scaled_channels(64, 0.3), scaled_channels(32, 0.1)
    (32, 16, 8)
    """
    return max(divisor, int(channels * width + divisor / 2) // divisor * divisor)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class StagedBackbone(nn.Module):
    """A backbone as five stages; stage ``i`` outputs stride ``2 ** (i + 1)`` (2, 4, 8, 16, 32).

    ``out_indices`` picks the returned stages (default 2, 3, 4: strides 8, 16,
    32); stages after the last picked one are dropped, so they cost nothing.
    """

    def __init__(self, stages: list[nn.Module], stage_channels: list[int], out_indices: tuple[int, ...]) -> None:
        super().__init__()
        out_indices = tuple(out_indices)
        if (
            not out_indices
            or list(out_indices) != sorted(set(out_indices))
            or not 0 <= out_indices[0] <= out_indices[-1] < len(stages)
        ):
            raise ValueError(
                f"out_indices must be increasing stage indices in 0..{len(stages) - 1}, got {list(out_indices)}"
            )
        self.stages = nn.ModuleList(stages[: out_indices[-1] + 1])
        self.out_indices = out_indices
        self.out_channels = tuple(stage_channels[i] for i in out_indices)
        self.out_strides = tuple(2 ** (i + 1) for i in out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def last_conv_channels(module: nn.Module) -> int:
    """Output channels of the last convolution inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class ConvNet(StagedBackbone):
    """A VGG-like stack: a stride-2 stem conv, then four stages that halve the resolution.

    Each of those stages is ``depth`` conv-BN-ReLU blocks, the first with stride 2.
    """

    base_channels = (32, 64, 128, 256, 512)  # strides 2, 4, 8, 16, 32

    def __init__(self, width: float = 1.0, depth: int = 1, out_indices: tuple[int, ...] = (2, 3, 4)) -> None:
        chans = [scaled_channels(c, width) for c in self.base_channels]
        stages: list[nn.Module] = [conv_bn_relu(3, chans[0], stride=2)]
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks = [conv_bn_relu(cin, cout, stride=2)] + [conv_bn_relu(cout, cout) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        super().__init__(stages, chans, out_indices)


@register_backbone("convnet")
def convnet(
    width: float = 1.0, depth: int = 1, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)
) -> ConvNet:
    """Plain conv-BN-ReLU backbone; no pretrained weights exist for it.

    >>> m = convnet(width=0.25)
    >>> [f.shape[1:] for f in m(torch.zeros(1, 3, 64, 64))]
    [torch.Size([32, 8, 8]), torch.Size([64, 4, 4]), torch.Size([128, 2, 2])]
    """
    if pretrained:
        raise ValueError("convnet has no pretrained weights")
    return ConvNet(width=width, depth=depth, out_indices=tuple(out_indices))


def _downsamples(block: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and m.stride in (2, (2, 2)) for m in block.modules())


def split_by_stride(blocks: list[nn.Module]) -> list[nn.Module]:
    """Group a chain of blocks into stages, starting a new stage at each stride-2 block.

    >>> [len(s) for s in split_by_stride([conv_bn_relu(3, 8, 2), conv_bn_relu(8, 8), conv_bn_relu(8, 8, 2)])]
    [2, 1]
    """
    stages: list[list[nn.Module]] = []
    for block in blocks:
        if not stages or _downsamples(block):
            stages.append([])
        stages[-1].append(block)
    return [nn.Sequential(*s) for s in stages]
