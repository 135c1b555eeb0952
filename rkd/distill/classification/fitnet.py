"""FitNet hint learning for scene classifiers.

A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin
Deep Nets", ICLR 2015, arXiv:1412.6550 (no DOI). A 1x1 conv regressor ``r``
(:func:`rkd.distill.connectors.conv_connector`) maps the student's hint-level map to the
teacher's channels::

    L_hint = mean_{b,c,h,w} (t - r(s))^2                               (eq. 3, per element)

computed by :func:`rkd.distill.functional.mse`, as detection's ``fitnet``. The default level is
the middle one, the paper's choice of a middle hint layer. One term ``feat``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.checks import check_level_stride, check_same_levels
from rkd.distill.connectors import conv_connector
from rkd.distill.functional import mse
from rkd.outputs import ClassifierInfo, ClassifierOutput

HINT_LEVELS = ("first", "middle", "last")


def hint_level(which: str, num_levels: int) -> int:
    """Index of the ``first``/``middle``/``last`` feature level (FitNet's hint layer).

    >>> [hint_level(w, 3) for w in HINT_LEVELS], hint_level("middle", 4)
    ([0, 1, 2], 2)
    """
    return {"first": 0, "middle": num_levels // 2, "last": num_levels - 1}[which]


@register("fitnet", task="classification")
class ClassifierFitNet(KDComponent):
    """Hint learning (eq. 3) at one backbone level through a 1x1 regressor; one term ``feat``."""

    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the feature MSE"),
        "level": Param("choice", "middle", choices=HINT_LEVELS, help="which backbone level is the hint"),
    }

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        assert teacher is not None
        check_same_levels(cls.name, student, teacher)
        index = hint_level(hparams["level"], student.num_levels)
        check_level_stride(cls.name, student, teacher, index, hparams["level"])

    def __init__(self, student: ClassifierInfo, teacher: ClassifierInfo | None, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        assert teacher is not None
        self.index = hint_level(self.hparams["level"], student.num_levels)
        self.regressor = conv_connector(student.level_channels[self.index], teacher.level_channels[self.index], 1)

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        hint = mse(self.regressor(student.features[self.index]), teacher.features[self.index])  # eq. 3
        return {"feat": self.hparams["weight"] * hint}
