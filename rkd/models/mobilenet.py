"""MobileNetV2 backbone (torchvision's inverted-residual blocks) with a width multiplier."""

from __future__ import annotations

from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from rkd.models.backbones import StagedBackbone, last_conv_channels, register_backbone, split_by_stride


class MobileNetV2(StagedBackbone):
    """MobileNetV2 features split at each stride-2 block into stages at strides 2..32.

    The final 1x1 conv to 1280 channels (a classifier's feature head) is left
    out: the stride-32 output is the last inverted residual block (320 x width).
    """

    def __init__(self, width: float = 1.0, out_indices: tuple[int, ...] = (2, 3, 4)) -> None:
        features = tv_mobilenet_v2(weights=None, width_mult=width).features
        stages = split_by_stride(list(features)[:-1])
        super().__init__(stages, [last_conv_channels(s) for s in stages], out_indices)


@register_backbone("mobilenet_v2")
def mobilenet_v2(width: float = 1.0, pretrained: bool = False, out_indices: tuple[int, ...] = (2, 3, 4)) -> MobileNetV2:
    """MobileNetV2; its channels at strides 8/16/32 are 32/96/320 at width 1.

    >>> mobilenet_v2().out_channels
    (32, 96, 320)
    """
    if pretrained:
        raise ValueError("mobilenet_v2 has no offline pretrained weights; use backbone.weights: PATH")
    return MobileNetV2(width, tuple(out_indices))
