"""FRS: distillation with the feature richness score.

Z. Du, R. Zhang, M. Chang, X. Zhang, S. Liu, T. Chen, Y. Chen, "Distilling Object Detectors with
Feature Richness", NeurIPS 2021, arXiv:2111.00674 (no DOI). The paper's text is not on file, so
the labels (F1)-(F3) below are this module's own. The feature richness of a location is the
teacher's highest class probability there (per FPN level, ``(B, 1, H, W)``, detached)::

    S = max_{a,k} sigmoid(z_t)                                                      (F1)

it weights both feature imitation through a 3x3 adapter ``phi`` and classification KD::

    L_feat = w_f * sum_l sum S * sum_c (F_t - phi(F_s))^2 / sum S                   (F2)
    L_cls  = w_c * sum_l sum S * sum_{a,k} BCE(sigmoid(z_s), sigmoid(z_t)) / sum S  (F3)

Defaults w_f = 0.005, w_c = 0.02: the authors' RetinaNet R101 -> R50 config
(``feat_loss_scale``, ``cls_loss_scale``). Differences from the released code: its adapter
is a 3x3 conv followed by a ReLU (which cannot produce the negative values of FPN outputs;
rkd uses the plain conv) and it ramps the loss up over the first 500 iterations (rkd's
training loop owns schedules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.connectors import conv_adapters
from rkd.distill.functional import binary_kl_with_logits
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def richness(teacher_cls: Tensor) -> Tensor:
    """``(B, 1, H, W)`` feature richness score (F1) from a ``(B, A*K, H, W)`` teacher class map.

    >>> richness(torch.tensor([[[[0.0]], [[2.0]]]])).flatten().tolist() == [torch.sigmoid(torch.tensor(2.0)).item()]
    True
    """
    return torch.sigmoid(teacher_cls.detach()).amax(dim=1, keepdim=True)


@register("frs")
class FRS(KDComponent):
    """Feature-richness-weighted feature and class KD; terms ``feat`` and ``cls``."""

    requires = frozenset({"same_anchors"})
    params = {
        "feat_weight": Param("float", 0.005, 1e-4, 0.1, log=True, help="feature term weight (released 0.005)"),
        "cls_weight": Param("float", 0.02, 1e-3, 1.0, log=True, help="class term weight (released 0.02)"),
    }

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        self.adapters = conv_adapters(student, teacher, kernel_size=3)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        feat, cls = 0.0, 0.0
        for a, fs, ft, cs, ct in zip(
            self.adapters, student.features, teacher.features, student.cls_logits, teacher.cls_logits
        ):
            s = richness(ct)
            norm = s.sum().clamp(min=torch.finfo(s.dtype).tiny)
            feat = feat + ((ft.detach() - a(fs)) ** 2 * s).sum() / norm  # (F2)
            # binary KL: the BCE's gradient, without the teacher's entropy in the value (balance)
            bce = binary_kl_with_logits(cs, ct)
            cls = cls + (bce * s).sum() / norm  # (F3)
        return {"feat": self.hparams["feat_weight"] * feat, "cls": self.hparams["cls_weight"] * cls}
