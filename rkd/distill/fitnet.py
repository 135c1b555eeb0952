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

from torch import Tensor, nn

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
    }

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        check_same_grid(cls.name, student, teacher)

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        self.adapters = conv_adapters(student, teacher, kernel_size=1)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        levels = [mse(a(fs), ft.detach()) for a, fs, ft in zip(self.adapters, student.features, teacher.features)]
        return {"feat": self.hparams["weight"] * sum(levels) / len(levels)}
