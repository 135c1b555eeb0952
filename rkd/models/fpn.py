"""Feature pyramid network over a backbone's stride-8/16/32 outputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Top-down FPN producing ``levels`` maps of ``channels`` channels, finest first.

    The first maps (one per backbone output) are built by 1x1 laterals, nearest
    upsampling and a 3x3 smoothing conv. Levels beyond the backbone's coarsest
    one (RetinaNet's P6, P7) come from stride-2 3x3 convs, the first applied to
    the coarsest FPN output, the next ones after a ReLU.

    >>> import torch
    >>> fpn = FPN((16, 32, 64), channels=24, levels=5)
    >>> outs = fpn([torch.zeros(1, 16, 16, 16), torch.zeros(1, 32, 8, 8), torch.zeros(1, 64, 4, 4)])
    >>> [tuple(o.shape[1:]) for o in outs]
    [(24, 16, 16), (24, 8, 8), (24, 4, 4), (24, 2, 2), (24, 1, 1)]
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int, levels: int = 3) -> None:
        super().__init__()
        if levels < len(in_channels):
            raise ValueError(f"levels must be >= {len(in_channels)} (one per backbone output), got {levels}")
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(levels - len(in_channels))
        )
        self.channels = channels
        self.levels = levels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.laterals, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.smooth, lat)]
        for i, conv in enumerate(self.extra):
            outs.append(conv(outs[-1] if i == 0 else F.relu(outs[-1])))
        return outs
