"""FitNet feature imitation for detectors.

A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin
Deep Nets", ICLR 2015, arXiv:1412.6550 (no DOI).

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

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.connectors import AdapterScaleInit, adapter_init_param, conv_adapters
from rkd.distill.functional import mse
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


@register("fitnet")
class FitNet(KDComponent):
    """FPN feature imitation through per-level 1x1 adapters; one term ``feat``."""

    requires = frozenset({"same_grid"})
    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the feature MSE (averaged over levels)"),
        "adapter_init": adapter_init_param("PyTorch's default init"),
    }

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        self.adapters = conv_adapters(student, teacher, kernel_size=1)
        self.adapter_scale = AdapterScaleInit(self.hparams["adapter_init"])

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        self.adapter_scale(self.adapters, student.features, teacher.features)
        # eq. 3 per level, averaged over the levels
        levels = [mse(a(fs), ft.detach()) for a, fs, ft in zip(self.adapters, student.features, teacher.features)]
        return {"feat": self.hparams["weight"] * sum(levels) / len(levels)}
