"""DKD: decoupled knowledge distillation for scene classifiers.

B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022,
arXiv:2203.08679 (no DOI here).

With ``p = softmax(z / T)`` over K classes and ``t`` the labelled class, DKD splits each
distribution into a binary one ``b = [p_t, 1 - p_t]`` (target vs. all other classes) and the
distribution over the non-target classes ``p^_i = p_i / (1 - p_t)``, ``i != t``. Then (eq. 1-2)::

    KL(p^T || p^S) = KL(b^T || b^S) + (1 - p_t^T) * KL(p^^T || p^^S)
                   =      TCKD      + (1 - p_t^T) *       NCKD

and the classic KD couples NCKD to the teacher's confidence through ``(1 - p_t^T)``. DKD drops
that factor and weights the parts freely (eq. 3)::

    L_DKD = T^2 * mean_b (alpha * TCKD + beta * NCKD)

Published defaults: alpha = 1, beta = 8, T = 4, and a linear warm-up of the loss weight over the
first 20 epochs on CIFAR-100 (``warmup_epochs``; 0 here since runs are short - the searchable
range includes the published value). The terms ``tckd`` and ``nckd`` are reported apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rkd.distill.base import KDComponent, Param, linear_ramp, register
from rkd.distill.functional import non_target_kd
from rkd.outputs import ClassifierOutput


def binary_log_probs(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``(N, 2)`` log of ``b = [p_t, 1 - p_t]`` of ``softmax(logits / T)``, computed stably.

    ``log(1 - p_t)`` is the log-sum-exp of the non-target logits minus that of all logits, so
    a confident prediction (``p_t`` near 1) does not lose it to cancellation.

    >>> binary_log_probs(torch.zeros(1, 4), torch.tensor([2]), 1.0).exp().tolist()
    [[0.25, 0.75]]
    """
    z = logits / temperature
    log_all = torch.logsumexp(z, dim=-1)
    is_target = F.one_hot(target, z.shape[-1]).bool()
    log_target = z.gather(-1, target[:, None]).squeeze(-1) - log_all
    log_other = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=-1) - log_all
    return torch.stack([log_target, log_other], dim=-1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Target-class KD per sample, ``T^2 * KL(b^T || b^S)`` (eq. 1's first term), shape ``(N,)``.

    >>> z = torch.randn(3, 5)
    >>> tckd(z, z, torch.tensor([0, 4, 2]), 4.0).abs().max().item() < 1e-6
    True
    """
    log_bs = binary_log_probs(student_logits, target, temperature)
    log_bt = binary_log_probs(teacher_logits.detach(), target, temperature)
    return (log_bt.exp() * (log_bt - log_bs)).sum(-1) * temperature**2


def nckd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Non-target-class KD per sample, ``T^2 * KL(p^^T || p^^S)`` (eq. 1's second KL), shape ``(N,)``."""
    return non_target_kd(student_logits, teacher_logits, target, temperature)


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(alpha * mean TCKD, beta * mean NCKD)`` over the batch (eq. 3, T^2 included)."""
    t = tckd(student_logits, teacher_logits, target, temperature).mean()
    n = nckd(student_logits, teacher_logits, target, temperature).mean()
    return alpha * t, beta * n


@register("dkd", task="classification")
class DKD(KDComponent):
    """Decoupled KD of the logits; terms ``tckd`` and ``nckd``."""

    params = {
        "alpha": Param("float", 1.0, 0.1, 4.0, log=True, help="weight of TCKD (published: 1)"),
        "beta": Param("float", 8.0, 0.5, 16.0, log=True, help="weight of NCKD (published: 8)"),
        "temperature": Param("float", 4.0, 1.0, 8.0, help="softening temperature T (published: 4)"),
        "warmup_epochs": Param(
            "float", 0.0, 0.0, 20.0, help="linear ramp of the loss weight (published: 20 on CIFAR-100)"
        ),
    }

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        hp: dict[str, Any] = self.hparams
        t, n = dkd_loss(student.logits, teacher.logits, labels, hp["alpha"], hp["beta"], hp["temperature"])
        return {"tckd": t, "nckd": n}

    def ramps(self, epoch: float) -> dict[str, float]:
        ramp = linear_ramp(epoch, self.hparams["warmup_epochs"])  # applied after the loss balance
        return {"tckd": ramp, "nckd": ramp}
