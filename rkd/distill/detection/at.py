"""AT: attention transfer on FPN features.

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928 (no DOI). The spatial attention
of a feature map is ``Q = vec(mean_c |F_c|^2)`` (eq. 1 with p = 2, the paper's choice), and::

    L_AT = beta / 2 * sum_l mean_{b,j} (Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2)_j^2      (eq. 2, released form)

with beta = 1e3 (the paper's and released code's default, which already folds in the division
by the attention map size through the mean). Attention maps are channel-free, so no adapter
is needed; student and teacher must share the feature grid. Eqs. 1-2 are
:func:`rkd.distill.functional.attention_map` and :func:`~rkd.distill.functional.at_loss`, shared with
classification's ``at``.
"""

from __future__ import annotations

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.functional import at_loss
from rkd.outputs import DetectorOutput, Targets


@register("at")
class AT(KDComponent):
    """Attention transfer over all FPN levels; one term ``attn``."""

    requires = frozenset({"same_grid"})
    params = {
        "weight": Param("float", 1000.0, 10.0, 1e4, log=True, help="beta of eq. 2 (paper and released: 1e3)"),
    }

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        total = sum(at_loss(fs, ft) for fs, ft in zip(student.features, teacher.features))  # eq. 2
        return {"attn": self.hparams["weight"] / 2 * total}
