"""Pure loss functions of tensors shared by KD components (no modules, no state).

Detection and classification methods share them: Hinton's tempered KL (:func:`softmax_kd`,
:func:`sigmoid_kd`), FitNet's hint MSE (:func:`mse`), AT's attention loss (:func:`at_loss`),
the binary KL of sigmoid heads and DKD's non-target KL.

Every function takes the student tensor first and the teacher tensor second and never
needs gradients through the teacher: callers pass detached teacher tensors, and the
functions detach again defensively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _BCEWithLogits(torch.autograd.Function):
    """Elementwise ``BCE(sigmoid(x), target)`` with ``log1p`` built from ``log`` (see :func:`bce_with_logits`)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, target)
        return bce_values(logits, target)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        logits, target = ctx.saved_tensors
        grad_logits = (torch.sigmoid(logits) - target) * grad if ctx.needs_input_grad[0] else None
        grad_target = -logits * grad if ctx.needs_input_grad[1] else None
        return grad_logits, grad_target


def bce_values(logits: Tensor, target: Tensor) -> Tensor:
    """The values of :func:`bce_with_logits`, without autograd (for fused autograd functions)."""
    with torch.no_grad():
        u = logits.abs().neg_().exp_()  # exp(-|x|) in (0, 1]: never overflows
        w = u + 1.0
        # log1p(u) = log(w) + (u - (w - 1)) / w: the second term restores what rounding 1 + u
        # lost, so small u keep full relative precision (exactly u when w rounds to 1).
        log1p_u = torch.log(w).add_((u - (w - 1.0)).div_(w))
        return logits.clamp_min(0.0).sub_(logits * target).add_(log1p_u)


def bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Elementwise ``-(p log sigmoid(x) + (1 - p) log(1 - sigmoid(x)))``, as
    ``F.binary_cross_entropy_with_logits(x, p, reduction="none")``.

    ``max(x, 0) - x p + log1p(exp(-|x|))``, with ``log1p`` computed from ``log``: PyTorch's CPU
    ``log1p`` (which its BCE, ``softplus`` and ``logsigmoid`` use) is not vectorised and took
    ~12x longer than ``log`` on the KD terms' logits here (``bench/kd_overhead.py``). Values
    agree with the float64 formula to float32 rounding; the gradient is ``sigmoid(x) - p``
    (and ``-x`` for the target). ``target`` must broadcast to ``logits``' shape.

    >>> x = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0])
    >>> [round(v, 6) for v in bce_with_logits(x, torch.full_like(x, 0.25)).tolist()]
    [25.0, 0.798587, 0.693147, 2.298587, 75.0]
    """
    return _BCEWithLogits.apply(logits, target.expand_as(logits))


def mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over all elements.

    >>> mse(torch.ones(2, 3), torch.zeros(2, 3)).item()
    1.0
    """
    return F.mse_loss(student, teacher.detach(), reduction="mean")


def binary_kl_with_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Elementwise ``KL(Bern(sigmoid(z_t)) || Bern(sigmoid(z_s)))`` = BCE(z_s, p_t) - H(p_t).

    The same gradient as the BCE with the teacher's probability as soft target, but 0 where the
    two agree: a KD loss whose value measures the mismatch (what the loss balance compares with
    the task loss) instead of the teacher's own entropy. The teacher side is detached.

    >>> z = torch.tensor([-3.0, 0.0, 2.0])
    >>> binary_kl_with_logits(z, z).abs().max().item() < 1e-6
    True
    """
    p = torch.sigmoid(teacher_logits.detach())
    return bce_with_logits(student_logits, p) - bce_with_logits(teacher_logits.detach(), p)


def sigmoid_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class binary KD for sigmoid (dense-detector) classifiers.

    ``T^2 * mean(KL(sigmoid(z_t / T) || sigmoid(z_s / T)))`` over all elements (binary KL per
    element): the gradient of the BCE with the teacher's tempered probability as soft target, with
    the teacher's constant binary entropy taken out of the value, so the value is 0 at a match.

    >>> z = torch.zeros(1, 4)
    >>> round(sigmoid_kd(z, z, 2.0).item(), 4)
    0.0
    >>> round(sigmoid_kd(torch.zeros(1, 1), torch.full((1, 1), 2.0), 2.0).item(), 4)  # 4 * KL(0.731 || 0.5)
    0.4438
    """
    t = temperature
    return binary_kl_with_logits(student_logits / t, teacher_logits / t).mean() * t * t


def softmax_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` over the last dim, mean over the rest.

    >>> z = torch.randn(3, 5)
    >>> softmax_kd(z, z, 4.0).abs().item() < 1e-6
    True
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t


def standardise(feature: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel standardisation over (B, H, W); all zeros where B x H x W is 1.

    >>> f = standardise(torch.randn(2, 3, 4, 4) * 5 + 2)
    >>> bool(f.mean((0, 2, 3)).abs().max() < 1e-5), bool((f.std((0, 2, 3)) - 1).abs().max() < 1e-4)
    (True, True)
    >>> standardise(torch.randn(1, 3, 1, 1)).abs().max().item()
    0.0
    """
    n = feature.numel() // max(feature.shape[1], 1)
    mean = feature.mean(dim=(0, 2, 3), keepdim=True)
    # Bessel's correction needs two values; with one, n - 1 = 0 would give std NaN.
    std = feature.std(dim=(0, 2, 3), keepdim=True, correction=1 if n > 1 else 0)
    return (feature - mean) / (std + eps)


def masked_sq_error(student: Tensor, teacher: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum((s - t)^2 * mask), sum(mask))``; ``mask`` ``(B, 1, H, W)`` broadcasts over channels.

    The second value counts locations (not location x channel): FGD normalises by it, NSD
    multiplies it by the channel count (its released per-element mean).

    >>> masked_sq_error(torch.ones(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), torch.tensor([[[[1.0, 0.0]]]]))
    (tensor(2.), tensor(1.))
    """
    return ((student - teacher.detach()) ** 2 * mask).sum(), mask.sum()


def non_target_kd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float) -> Tensor:
    """Per-sample non-target-class KD (NCKD of decoupled KD), summed over classes, ``T^2`` included.

    ``KL(p_t^ || p_s^) * T^2`` where ``p^`` is the softmax of ``z/T`` over the classes other
    than ``target`` (``target`` ``(N,)`` long, or ``None``/``-1`` entries for "no target": all
    classes). Returns ``(N,)``; the caller weights and reduces.

    >>> z = torch.randn(4, 6)
    >>> non_target_kd(z, z, torch.tensor([0, 1, -1, 5]), 4.0).abs().max().item() < 1e-6
    True
    """
    t = temperature
    zs, zt = student_logits / t, teacher_logits.detach() / t
    if target is not None:
        k = zs.shape[-1]
        hide = F.one_hot(target.clamp(min=0), k).bool() & (target >= 0)[:, None]
        # Large negative (not -inf) keeps the KL terms of masked classes at exactly 0 * finite.
        zs = zs.masked_fill(hide, -1e4)
        zt = zt.masked_fill(hide, -1e4)
    log_p_s = F.log_softmax(zs, dim=-1)
    log_p_t = F.log_softmax(zt, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t


def attention_map(feature: Tensor) -> Tensor:
    """``(B, H*W)`` L2-normalised spatial attention ``mean_c F^2`` (Zagoruyko & Komodakis, eq. 1 with p = 2).

    >>> attention_map(torch.ones(1, 3, 2, 2)).tolist()
    [[0.5, 0.5, 0.5, 0.5]]
    """
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{b,j} (Q_s - Q_t)^2`` of one level, ``Q`` the :func:`attention_map` (eq. 2 without beta / 2)."""
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()
