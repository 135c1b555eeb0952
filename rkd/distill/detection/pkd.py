"""PKD: feature distillation with the Pearson correlation coefficient.

W. Cao, Y. Zhang, J. Gao, A. Cheng, K. Cheng, J. Cheng, "PKD: General Distillation Framework for
Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022, arXiv:2207.02039 (no DOI).
Each feature map is standardised per channel over batch and space, ``F^ = (F - mean) / (std + 1e-6)``
(unbiased std, as MMRazor's ``PKDLoss``), and::

    L_PKD = w * sum_l 1/2 * mean (F^_s - F^_t)^2                                  (eq. 3-4)

which equals ``w * (1 - r)`` per level up to the sample-size factor, ``r`` the Pearson
correlation. Default w = 10: the MMRazor PKD config for RetinaNet (X101 -> R50), which
uses ``loss_weight=10`` per FPN level. A 1x1 adapter aligns channels only where they differ.

A level with one location (batch 1 on a small tile, B x H x W = 1) has no correlation to match:
the unbiased std of one value is NaN (0/0), which made the whole loss NaN. There the population
std (0) is used, the centred feature is exactly 0 and the level adds 0 with zero gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rkd.distill.base import Param, register
from rkd.distill.connectors import AlignedFeatureKD
from rkd.distill.functional import standardise
from rkd.outputs import DetectorOutput, Targets


def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1/2 * mean (F^_s - F^_t)^2`` of one level."""
    return F.mse_loss(standardise(student), standardise(teacher.detach())) / 2  # eq. 3-4


@register("pkd")
class PKD(AlignedFeatureKD):
    """Pearson-correlation feature KD over all FPN levels; one term ``feat``."""

    params = {
        "weight": Param("float", 10.0, 0.1, 100.0, log=True, help="loss weight per level (MMRazor RetinaNet: 10)"),
    }

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        total = sum(pkd_loss(fs, ft) for fs, ft in self.aligned_levels(student, teacher))
        return {"feat": self.hparams["weight"] * total}
