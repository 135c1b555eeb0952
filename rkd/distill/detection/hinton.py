"""Logit distillation with temperature for dense detectors.

G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop, 2015, arXiv:1503.02531 (no DOI).

Two forms over the flattened per-anchor classification logits ``z`` (``(B, N, K)``):

* ``sigmoid`` (default; dense detectors score each class with its own sigmoid):
  ``T^2 * mean_{b,n,k} BCE(sigmoid(z_s/T), sigmoid(z_t/T))`` - the teacher's tempered
  per-class probability is the soft target (eq. 1 read per class as a two-way softmax).
* ``softmax`` (the paper's form): ``T^2 * mean_{b,n} KL(softmax(z_t/T) || softmax(z_s/T))``
  over the K classes (eq. 1 with the T^2 gradient scaling of section 2).

All anchors take part (positives, negatives and ignored ones: the teacher's soft scores
are informative everywhere).
"""

from __future__ import annotations

from torch import Tensor

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.functional import sigmoid_kd, softmax_kd
from rkd.outputs import DetectorOutput, Targets


@register("hinton")
class Hinton(KDComponent):
    """Logit KD on the classification outputs; one term ``cls``."""

    requires = frozenset({"same_anchors"})
    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the logit KD term"),
        "temperature": Param("float", 2.0, 1.0, 8.0, help="softening temperature T"),
        "form": Param("choice", "sigmoid", choices=("sigmoid", "softmax"), help="per-class sigmoid or softmax KL"),
    }

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        zs, zt = student.flat_cls(), teacher.flat_cls().detach()
        fn = sigmoid_kd if self.hparams["form"] == "sigmoid" else softmax_kd  # eq. 1, T^2-scaled (sec. 2)
        return {"cls": self.hparams["weight"] * fn(zs, zt, self.hparams["temperature"])}
