"""AT: attention transfer for scene classifiers.

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928 (no DOI).
With ``Q = vec(mean_c F^2)`` the spatial attention of a backbone map (eq. 1, p = 2)::

    L_AT = beta / 2 * sum_l mean_{b,j} (Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2)_j^2      (eq. 2, released form)

over every backbone level, computed by :func:`rkd.distill.functional.at_loss` as detection's ``at``;
beta = 1e3 (paper and released code). Student and teacher must share the strides. One term ``attn``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.checks import check_same_grid
from rkd.distill.functional import at_loss
from rkd.outputs import ClassifierInfo, ClassifierOutput


@register("at", task="classification")
class ClassifierAT(KDComponent):
    """Attention transfer (eqs. 1-2) over every backbone level; one term ``attn``."""

    params = {
        "weight": Param("float", 1000.0, 10.0, 1e4, log=True, help="beta of eq. 2 (paper and released: 1e3)"),
    }

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        assert teacher is not None
        check_same_grid(cls.name, student, teacher, "attention maps")

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        total = sum(at_loss(fs, ft) for fs, ft in zip(student.features, teacher.features))  # eq. 2
        return {"attn": self.hparams["weight"] / 2 * total}
