"""Hinton KD for scene classifiers: the tempered KL of the class distributions.

G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop, 2015, arXiv:1503.02531 (no DOI). With ``z`` the logits and ``T`` the temperature::

    L = T^2 * mean_b KL(softmax(z_t / T) || softmax(z_s / T))        (eq. 1, with the T^2 gradient scaling of sec. 2)

computed by :func:`rkd.distill.functional.softmax_kd`, the function detection's ``hinton`` uses
for its ``softmax`` form. One term ``logits``.
"""

from __future__ import annotations

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.functional import softmax_kd
from rkd.outputs import ClassifierOutput


@register("hinton", task="classification")
class ClassifierHinton(KDComponent):
    """Logit KD (eq. 1) on the classifier's logits; one term ``logits``."""

    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the logit KD term"),
        "temperature": Param("float", 4.0, 1.0, 8.0, help="softening temperature T"),
    }

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        kd = softmax_kd(student.logits, teacher.logits, self.hparams["temperature"])  # eq. 1
        return {"logits": self.hparams["weight"] * kd}
