"""CWD: channel-wise knowledge distillation.

C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021, arXiv:2011.13256 (no DOI here). Each
channel is turned into a distribution over its locations, ``phi(y)_{c,i} = softmax_i(y_{c,i} / tau)``
(eq. 3), and the student matches the teacher by KL per channel (eq. 4)::

    L_CWD = w * sum_l tau^2 / (B * C) * sum_{b,c} sum_i phi(y_t) log(phi(y_t) / phi(y_s))

Defaults w = 5, tau = 1: the authors' released RetinaNet config (mmdetection-distiller,
RetinaNet X101 -> R50 on the FPN outputs). A 1x1 adapter aligns channels only where they differ.
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests use it)
import torch.nn.functional as F
from torch import Tensor

from rkd.distill.base import Param, register
from rkd.distill.connectors import AlignedFeatureKD
from rkd.outputs import DetectorOutput, Targets


def cwd_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """``tau^2 / (B*C) * sum KL`` of the per-channel spatial distributions of one level.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> cwd_loss(x, x, 2.0).abs().item() < 1e-6
    True
    """
    b, c = student.shape[:2]
    log_s = F.log_softmax(student.flatten(2) / tau, dim=-1)  # eq. 3: phi(y_s), per channel over locations
    log_t = F.log_softmax(teacher.detach().flatten(2) / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() * tau**2 / (b * c)  # eq. 4


@register("cwd")
class CWD(AlignedFeatureKD):
    """Channel-wise distillation over all FPN levels; one term ``feat``."""

    params = {
        "weight": Param("float", 5.0, 0.1, 50.0, log=True, help="loss weight (released RetinaNet: 5)"),
        "temperature": Param("float", 1.0, 0.5, 8.0, log=True, help="tau (released: 1)"),
    }

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        tau = self.hparams["temperature"]
        total = sum(cwd_loss(fs, ft, tau) for fs, ft in self.aligned_levels(student, teacher))
        return {"feat": self.hparams["weight"] * total}
