"""FitNet feature imitation (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

The student's FPN feature of each level passes through a learned 1x1 conv adapter
(student channels -> teacher channels; the paper's regressor ``r``) and imitates the
teacher's feature of the same level:

    L_hint = 1/L * sum_l mean_{b,c,h,w} (t_l - r_l(s_l))^2        (eq. 3, averaged per element and level)

Default weight 1.0: per element and per level the term is the mean squared feature
difference, which for FPN outputs (roughly unit scale) is O(1) at the start of training -
the same order as a dense detector's classification and box losses - so it neither
swamps nor vanishes next to them; the search explores 1e-2..10 on a log scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rkd.distill.balance import collective_device
from rkd.distill.base import KDComponent, Param, register
from rkd.distill.functional import mse
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def conv_adapters(student: DetectorInfo, teacher: DetectorInfo, kernel_size: int = 1, bias: bool = True,
                  init_std: float | None = None) -> nn.ModuleList:
    """One conv per level mapping student channels to teacher channels ("same" padding).

    ``init_std`` draws the weights from N(0, init_std^2) with zero bias (default: PyTorch's init).
    """
    convs = nn.ModuleList()
    for cs, ct in zip(student.level_channels, teacher.level_channels):
        conv = nn.Conv2d(cs, ct, kernel_size, padding=kernel_size // 2, bias=bias)
        if init_std is not None:
            nn.init.normal_(conv.weight, std=init_std)
            if bias:
                nn.init.zeros_(conv.bias)
        convs.append(conv)
    return convs


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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "done" not in state_dict:  # KD parts saved before this init existed: trained, keep them
            state_dict = {**state_dict, prefix + "done": torch.tensor(True)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def forward(self, adapters: nn.ModuleList, student: list[Tensor], teacher: list[Tensor]) -> None:
        if bool(self.done) or not self.training:
            return
        tiny = torch.finfo(torch.float32).tiny
        gains = torch.stack([
            t.float().pow(2).mean().sqrt() / a(s).float().pow(2).mean().sqrt().clamp(min=tiny)
            for a, s, t in zip(adapters, student, teacher)
        ])
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
        "choice", "teacher_scale", choices=ADAPTER_INITS, published="plain",
        help=f"adapter output scaled to the teacher's feature RMS at the first step, or plain ({published})",
    )


def align_adapters(student: DetectorInfo, teacher: DetectorInfo) -> nn.ModuleList:
    """Per level: identity where channels agree, else a 1x1 conv (the FGD/CWD/PKD "align" layer)."""
    return nn.ModuleList(
        nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1)
        for cs, ct in zip(student.level_channels, teacher.level_channels)
    )


def check_same_grid(name: str, student: DetectorInfo, teacher: DetectorInfo) -> None:
    """``ValueError`` unless student and teacher feature maps share strides (hence spatial sizes)."""
    if tuple(student.strides) != tuple(teacher.strides):
        raise ValueError(
            f"KD method {name!r} compares feature maps location by location, but the student's strides "
            f"{list(student.strides)} differ from the teacher's {list(teacher.strides)}"
        )


def check_same_anchors(name: str, student: DetectorInfo, teacher: DetectorInfo) -> None:
    """``ValueError`` unless student and teacher heads have the same grid and anchors per location."""
    check_same_grid(name, student, teacher)
    if student.num_anchors != teacher.num_anchors:
        raise ValueError(
            f"KD method {name!r} compares per-anchor outputs, but the student has {student.num_anchors} "
            f"anchors per location and the teacher {teacher.num_anchors}"
        )


@register("fitnet")
class FitNet(KDComponent):
    """FPN feature imitation through per-level 1x1 adapters; one term ``feat``."""

    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the feature MSE (averaged over levels)"),
        "adapter_init": adapter_init_param("PyTorch's default init"),
    }

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        check_same_grid(cls.name, student, teacher)

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        self.adapters = conv_adapters(student, teacher, kernel_size=1)
        self.adapter_scale = AdapterScaleInit(self.hparams["adapter_init"])

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        self.adapter_scale(self.adapters, student.features, teacher.features)
        levels = [mse(a(fs), ft.detach()) for a, fs, ft in zip(self.adapters, student.features, teacher.features)]
        return {"feat": self.hparams["weight"] * sum(levels) / len(levels)}
