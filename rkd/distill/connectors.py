"""Connectors: the learned convolutions that map student features to the teacher's channels.

Every feature-based KD method compares a student map with a teacher map of (possibly) other
width; a connector (FitNet's "regressor", the "adapter" or "align" layer of later methods) maps
the student's channels to the teacher's. They train with the student and are dropped at export.

* :func:`conv_connector` / :func:`conv_adapters`: one conv (1x1 or 3x3, "same" padding) per
  level, PyTorch's init or N(0, std^2) weights with zero bias.
* :func:`align_adapters`: identity where the channels already agree, else a 1x1 conv.
* :class:`AlignedFeatureKD`: the base of the methods that compare FPN features level by level
  on one grid through :func:`align_adapters` (FGD, CWD, PKD).
* :class:`AdapterScaleInit` with :func:`adapter_init_param`: the ``adapter_init`` parameter of a
  method with adapters (``teacher_scale``: outputs rescaled to the teacher's feature RMS at the
  first step; ``plain``: left as initialised).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from rkd.distill.balance import collective_device
from rkd.distill.base import KDComponent, Param
from rkd.outputs import DetectorInfo, DetectorOutput


def conv_connector(
    in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True, init_std: float | None = None
) -> nn.Conv2d:
    """A conv mapping ``in_channels`` to ``out_channels`` with "same" padding.

    ``init_std`` draws the weights from N(0, init_std^2) with zero bias (default: PyTorch's init).
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    if init_std is not None:
        nn.init.normal_(conv.weight, std=init_std)
        if bias:
            nn.init.zeros_(conv.bias)
    return conv


def conv_adapters(
    student: Any, teacher: Any, kernel_size: int = 1, bias: bool = True, init_std: float | None = None
) -> nn.ModuleList:
    """One :func:`conv_connector` per level from ``student.level_channels`` to ``teacher.level_channels``."""
    return nn.ModuleList(
        conv_connector(cs, ct, kernel_size, bias, init_std)
        for cs, ct in zip(student.level_channels, teacher.level_channels)
    )


def align_adapters(student: Any, teacher: Any) -> nn.ModuleList:
    """Per level: identity where channels agree, else a 1x1 conv (the FGD/CWD/PKD "align" layer)."""
    return nn.ModuleList(
        nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1)
        for cs, ct in zip(student.level_channels, teacher.level_channels)
    )


class AlignedFeatureKD(KDComponent):
    """A detection component comparing FPN features location by location (student and teacher on one
    grid), the student's through the per-level :func:`align_adapters` (``self.adapters``)."""

    requires = frozenset({"same_grid"})

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        self.adapters = align_adapters(student, teacher)

    def aligned_levels(self, student: DetectorOutput, teacher: DetectorOutput) -> Iterator[tuple[Tensor, Tensor]]:
        """``(aligned student feature, teacher feature)`` per level, each aligned when it is reached."""
        for adapter, fs, ft in zip(self.adapters, student.features, teacher.features):
            yield adapter(fs), ft


ADAPTER_INITS = ("teacher_scale", "plain")


class AdapterScaleInit(nn.Module):
    """Data-dependent init of feature adapters: at the first training step, each level's adapter is
    rescaled so its output has the teacher feature's root-mean-square value.

    Why: an adapter initialised for unit-scale inputs outputs features of the student's scale, and
    an imitation loss then asks for the teacher's. Detector features are not unit-scale (UCAS-AOD,
    512 px: EfficientNet-Lite0 FPN RMS 4.7-9.4 per level, the convnet student's 1.5-1.8), and an
    adapter trained by Adam at lr 1e-3 moves its weights by about 1e-3 per step, too little to close
    a 5x gap in a short schedule; the loss then closes it by inflating the student's own features
    (measured: NSD's background imitation doubled the student's feature RMS and took its mAP50 from
    0.19 to 0.02), which the detection head pays for. Matching the scale once, before the first
    step, leaves the adapter's direction random and its learning unchanged. Only the scale is set
    (the same factor on weight and bias), so ``plain`` (the method's published init) stays available.
    Under DDP the factors are averaged over the ranks, so every rank keeps identical weights.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ADAPTER_INITS:
            raise ValueError(f"adapter_init: expected one of {list(ADAPTER_INITS)}, got {mode!r}")
        # saved with the KD parts: a resumed run does not rescale its trained adapters again
        self.register_buffer("done", torch.tensor(mode != "teacher_scale"))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        if prefix + "done" not in state_dict:  # KD parts saved before this init existed: trained, keep them
            state_dict = {**state_dict, prefix + "done": torch.tensor(True)}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def forward(self, adapters: nn.ModuleList, student: list[Tensor], teacher: list[Tensor]) -> None:
        if bool(self.done) or not self.training:
            return
        tiny = torch.finfo(torch.float32).tiny
        gains = torch.stack(
            [
                t.float().pow(2).mean().sqrt() / a(s).float().pow(2).mean().sqrt().clamp(min=tiny)
                for a, s, t in zip(adapters, student, teacher)
            ]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gains = gains.to(collective_device())
            torch.distributed.all_reduce(gains)
            gains = gains / torch.distributed.get_world_size()
        for adapter, gain in zip(adapters, gains.tolist()):
            for p in adapter.parameters():
                p.mul_(gain)
        self.done.fill_(True)


def adapter_init_param(published: str) -> Param:
    """The ``adapter_init`` parameter of a method with feature adapters (see :class:`AdapterScaleInit`)."""
    return Param(
        "choice",
        "teacher_scale",
        choices=ADAPTER_INITS,
        published="plain",
        help=f"adapter output scaled to the teacher's feature RMS at the first step, or plain ({published})",
    )


__all__ = [
    "ADAPTER_INITS",
    "AdapterScaleInit",
    "AlignedFeatureKD",
    "adapter_init_param",
    "align_adapters",
    "conv_adapters",
    "conv_connector",
]
