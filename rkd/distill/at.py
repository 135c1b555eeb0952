"""AT: attention transfer on FPN features.

Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. The spatial attention
of a feature map is ``Q = vec(mean_c |F_c|^2)`` (eq. 1 with p = 2, the paper's choice), and::

    L_AT = beta / 2 * sum_l mean_{b,j} (Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2)_j^2      (eq. 2, released form)

with beta = 1e3 (the paper's and released code's default, which already folds in the division
by the attention map size through the mean). Attention maps are channel-free, so no adapter
is needed; student and teacher must share the feature grid.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.fitnet import check_same_grid
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def attention_map(feature: Tensor) -> Tensor:
    """``(B, H*W)`` L2-normalised spatial attention ``mean_c F^2`` (eq. 1, p = 2).

    >>> import torch
    >>> attention_map(torch.ones(1, 3, 2, 2)).tolist()
    [[0.5, 0.5, 0.5, 0.5]]
    """
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{b,j} (Q_s - Q_t)^2`` of one level."""
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


@register("at")
class AT(KDComponent):
    """Attention transfer over all FPN levels; one term ``attn``."""

    params = {
        "weight": Param("float", 1000.0, 10.0, 1e4, log=True, help="beta of eq. 2 (paper and released: 1e3)"),
    }

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        check_same_grid(cls.name, student, teacher)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        total = sum(at_loss(fs, ft) for fs, ft in zip(student.features, teacher.features))
        return {"attn": self.hparams["weight"] / 2 * total}
