"""NSD: negative-core sample knowledge distillation for oriented detection.

W. Zhang, Y. Zhang, F. Huang, X. Qi, L. Wang, X. Liu, "Negative-Core Sample Knowledge Distillation
for Oriented Object Detection in Remote Sensing Image", IEEE Transactions on Geoscience and Remote
Sensing 62, pp. 1-18, 2024, DOI 10.1109/TGRS.2024.3492046 (code: github.com/Changan00/NSD,
mmrotate 0.3.4, rotated RetinaNet le90). The released repository lacks its head class, so this is
a rebuild from the paper's description and the released configuration; where this file departs
from the released code it says so. Only the paper's abstract was available to this project, so
the equation labels (N1)-(N7) below are this module's own, not the paper's numbering.

Four switchable parts (``pixel``, ``logit``, ``box``, ``angle``; any non-empty subset):

* pixel - feature imitation through a per-level 3x3 adapter (weights N(0, 1e-4^2); by default
  rescaled at the first step to the teacher's feature scale, ``adapter_init``, see
  :class:`rkd.distill.fitnet.AdapterScaleInit`: released ``plain``), split by
  the GT foreground mask ``m`` (a location is foreground if its cell overlaps a GT box), each
  a mean over the masked elements (locations x the teacher's ``C`` channels)::

      L_fg = sum((phi(s) - t)^2 * m) / max(1, 2 * C * sum(m))                       (N1)
      L_bg = sum((phi(s) - t)^2 * (1 - m)) / max(1, 2 * C * sum(1 - m))
      L_pixel = 1/L * sum_levels (w_fg * L_fg + w_bg * L_bg)     released: w_fg 0, w_bg 12   (N2)

  The released detector repeats the mask over the channels before summing it, so its
  normaliser counts location x channel elements, and divides by the number of levels; a
  normaliser counting locations only made the term C x levels too large (~2e3 instead of 6 at
  defaults on unit-scale 64-channel features over 5 levels).

* logit - on the negative-core samples (NCS) S. A negative's target is the background, which
  a sigmoid head (every head here) has no logit for, so every class is "non-target".
  ``logit_form: binary`` (default) treats each class score as a binary distribution, as BCKD
  does for sigmoid heads (Yang et al., "Bridging Cross-task Protocol Inconsistency for
  Distillation in Dense Object Detection", ICCV 2023, arXiv 2308.14286), so the absolute
  scores - the background knowledge of a negative - are distilled; with ``p = sigmoid(z_t/T)``,
  ``q = sigmoid(z_s/T)`` per class::

      KL_i = sum_k [p log(p / q) + (1 - p) log((1 - p) / (1 - q))]                  (N3)

  ``logit_form: softmax`` is the released code's NCKD of decoupled KD over the K classes,
  ``KL_i = KL(softmax(z_t,i/T) || softmax(z_s,i/T))``; it only sees score ratios between
  classes, so it is identically 0 for K = 1 (refused) and blind to absolute scores for K = 2::

      L_logit = w * min(epoch / E_warm, 1) * beta * T^2 / |S| * sum_{i in S} KL_i    (N4)
      released: w 1.8, beta 8, T 4, E_warm 3

* box - ``L_box = w / (|S| * D) * sum_{i in S} |r_s,i - r_t,i|_1`` (N5) on the encoded regressions, w 0.9.

* angle - the angle branch classifies the angle into bins. With ``p_i = softmax(a_t,i / T)``
  the teacher's angle distribution on sample ``i``:

  1. circular smoothing (CSL): ``p~_i = G p_i`` with ``G`` the row-normalised circulant
     Gaussian window over circular bin distance (``csl_sigma`` bins; 0 = none);
  2. category direction estimation (CE): with ``c_i = argmax_k z_t,i`` the teacher's predicted
     class and ``s_i`` its score, the class direction prior
     ``pi_c = sum_{i in S, c_i = c} s_i p~_i / sum_{i in S, c_i = c} s_i`` (over the batch);
     the target is ``q_i = (1 - lambda) p~_i + lambda pi_{c_i}`` (``ce_mix`` = lambda)     (N6);
  3. NCKD on the bins with the estimated direction ``j_i = argmax q_i`` as the target bin::

       L_angle = w * beta * T^2 / |S| * sum_{i in S} KL(q^_i || p^_s,i)                (N7)

     where ``^`` drops bin ``j_i`` and renormalises (student: softmax of ``a_s,i/T`` over the
     other bins). Released: w 1.0, beta 8, T 4 (shared with the logit part). Fewer than 3 bins
     leave one bin after the drop, a term identically 0: refused.

NCS selection (``ncs``): the negative *core* is the teacher's hard negatives, the background
the teacher scores as object-like. ``topk`` keeps the ``k`` negatives per image with
the highest teacher max-class sigmoid score; ``threshold`` the negatives whose teacher score
exceeds ``threshold``; ``all`` (default) every negative (``Assignment.neg_mask``; the released
code's ``use_sample='negn'``). ``gap`` (rkd's, an option) keeps the ``k`` negatives where student and
teacher disagree most, ``max_k |sigmoid(z_s) - sigmoid(z_t)|``: the teacher's hardest negatives
may be its own false positives, whose scores the student would copy, while the negatives the
*student* gets wrong are where the teacher's background knowledge could correct it.

``positives: true`` (rkd's, an option) adds the positive samples to S for the logit, box and angle
terms, so the negative core complements the positives' knowledge instead of replacing it.
Neither beat the core at NSD's old share 0.1 on UCAS-AOD over 10 seeds, where the pixel part took
~98% of the pull (docs/benchmarks.md, issue 16), so both stay off; a search may switch them on.

rkd's defaults (measured; every departure from the released configuration declares its published
value, so ``published_defaults`` and ``<method>@published`` still run the released one): the logit
part alone, on every negative (``ncs: all``, the released ``use_sample='negn'``), pulling as hard as
the detection loss (``balance_share`` 1 under ``kd_balance: auto``). On UCAS-AOD (Lite0 teacher,
8-epoch convnet student, paired over 14 seeds, docs/benchmarks.md "Issue 16, session 32") this lifts
the student by +0.061 mAP50 [+0.033, +0.089], as much as Hinton KD, while the released four-part
configuration ties it at a pull the student survives (0.1x) and lowers it at 0.3x, and the logit part
on the teacher's 100 hardest negatives per image at 1x lowers it (4 of 4 seeds): pulled hard towards
the teacher's scores on the background it finds object-like (its own false positives among them), the
student learns to fire there; spread over every negative, the term mostly teaches the teacher's low
background scores, dense supervision the student can use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rkd.distill.base import KDComponent, Param, linear_ramp, register
from rkd.distill.checks import check_same_anchors, check_same_box_dim, check_same_grid
from rkd.distill.connectors import AdapterScaleInit, adapter_init_param, conv_adapters
from rkd.distill.functional import binary_kl_with_logits, masked_sq_error, non_target_kd, standardise
from rkd.distill.masks import foreground_masks
from rkd.outputs import Assignment, DetectorInfo, DetectorOutput, Targets, flatten_levels

PARTS = ("pixel", "logit", "box", "angle")


# ----------------------------------------------------------------------------- pure functions


def pixel_fg_bg_loss(student: Tensor, teacher: Tensor, fg: Tensor) -> tuple[Tensor, Tensor]:
    """``(L_fg, L_bg)`` (N1) of one level; ``fg`` is the ``(B, 1, H, W)`` foreground mask.

    Half the mean squared error over the masked elements (locations x channels).

    >>> s, t = torch.ones(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    >>> [round(x.item(), 3) for x in pixel_fg_bg_loss(s, t, torch.tensor([[[[1.0, 0.0]]]]))]
    [0.5, 0.5]
    """
    c = teacher.shape[1]
    num_fg, den_fg = masked_sq_error(student, teacher, fg)
    num_bg, den_bg = masked_sq_error(student, teacher, 1.0 - fg)
    return num_fg / (2 * c * den_fg).clamp(min=1.0), num_bg / (2 * c * den_bg).clamp(min=1.0)


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 * sum_k KL(Bern(sigmoid(z_t/T)) || Bern(sigmoid(z_s/T)))`` (N3) of ``(N, K)`` logits.

    The binary cross-entropy to the teacher's tempered score minus the teacher's (constant)
    binary entropy; the gradient is ``T (sigmoid(z_s/T) - sigmoid(z_t/T))``.

    >>> z = torch.tensor([[-3.0, 2.0]])
    >>> binary_kl(z, z, 4.0).abs().item() < 1e-6, round(binary_kl(torch.zeros(1, 1), z[:, :1], 1.0).item(), 4)
    (True, 0.5023)
    """
    t = temperature
    return binary_kl_with_logits(student_logits / t, teacher_logits / t).sum(-1) * t * t


def select_ncs(neg: Tensor, score: Tensor, mode: str, k: int = 100, threshold: float = 0.05) -> Tensor:
    """Negative-core samples ``(B, N)`` bool from negatives ``neg`` and teacher scores ``score``.

    >>> neg = torch.tensor([[True, True, False, True]])
    >>> score = torch.tensor([[0.1, 0.9, 0.99, 0.5]])
    >>> select_ncs(neg, score, "topk", k=2).tolist(), select_ncs(neg, score, "threshold", threshold=0.3).tolist()
    ([[False, True, False, True]], [[False, True, False, True]])
    """
    if mode == "all":
        return neg
    if mode == "threshold":
        return neg & (score > threshold)
    if mode != "topk":
        raise ValueError(f"unknown NCS selection {mode!r}")
    k = min(int(k), neg.shape[1])
    masked = score.masked_fill(~neg, float("-inf"))
    idx = masked.topk(k, dim=1).indices
    chosen = torch.zeros_like(neg).scatter(1, idx, True)
    return chosen & neg  # fewer than k negatives: the -inf picks are dropped


def circular_gaussian(bins: int, sigma: float, device=None, dtype=torch.float32) -> Tensor:
    """``(bins, bins)`` row-stochastic circulant Gaussian window (identity when ``sigma`` is 0).

    >>> g = circular_gaussian(6, 1.0)
    >>> torch.allclose(g.sum(1), torch.ones(6)), torch.allclose(g[0, 1], g[0, 5])
    (True, True)
    """
    if sigma <= 0:
        return torch.eye(bins, device=device, dtype=dtype)
    i = torch.arange(bins, device=device, dtype=dtype)
    d = (i[:, None] - i[None, :]).abs()
    d = torch.minimum(d, bins - d)
    g = torch.exp(-(d**2) / (2 * sigma**2))
    return g / g.sum(1, keepdim=True)


def category_direction_target(
    teacher_angle_logits: Tensor, teacher_cls_logits: Tensor, temperature: float, csl_sigma: float, ce_mix: float
) -> Tensor:
    """Target angle distributions ``q`` ``(n, bins)`` for ``n`` selected samples (steps 1-2 above, (N6))."""
    bins = teacher_angle_logits.shape[-1]
    p = F.softmax(teacher_angle_logits / temperature, dim=-1)
    p = p @ circular_gaussian(bins, csl_sigma, p.device, p.dtype).T
    if ce_mix <= 0 or p.shape[0] == 0:
        return p
    score, cls = torch.sigmoid(teacher_cls_logits).max(dim=-1)
    onehot = F.one_hot(cls, teacher_cls_logits.shape[-1]).to(p.dtype) * score[:, None]  # (n, K)
    prior = onehot.T @ p  # (K, bins)
    prior = prior / prior.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    return (1 - ce_mix) * p + ce_mix * prior[cls]


def non_target_kl_probs(target: Tensor, student_logits: Tensor, target_bin: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 * KL(q^ || p^_s)`` with bin ``target_bin`` dropped and both renormalised (N7).

    >>> q = torch.softmax(torch.randn(3, 5), -1)
    >>> non_target_kl_probs(q, torch.log(q) * 2.0, torch.tensor([0, 2, 4]), 2.0).abs().max().item() < 1e-5
    True
    """
    keep = ~F.one_hot(target_bin, target.shape[-1]).bool()
    q = target * keep
    q = q / q.sum(-1, keepdim=True).clamp(min=torch.finfo(q.dtype).tiny)
    log_ps = F.log_softmax((student_logits / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    log_q = torch.log(q.clamp(min=torch.finfo(q.dtype).tiny))
    kl = torch.where(keep & (q > 0), q * (log_q - log_ps.masked_fill(~keep, 0.0)), torch.zeros_like(q))
    return kl.sum(-1) * temperature**2


# ----------------------------------------------------------------------------- the component


def _assignment(student: DetectorOutput, teacher: DetectorOutput) -> Assignment:
    assignment = student.assignment if student.assignment is not None else teacher.assignment
    if assignment is None:
        raise ValueError(
            "KD method 'nsd' needs the label assignment (DetectorOutput.assignment) to find negative samples; "
            "run the student forward with targets"
        )
    return assignment


@register("nsd")
class NSD(KDComponent):
    """Negative-core sample distillation at pixel, logit, box and angle level; terms named after the parts."""

    requires = frozenset({"assignment"})
    # balance_share 1 (the base class's): the default logit part on every negative pulls as hard as the
    # detection loss. The released four parts did not survive that pull (their pixel part dominates:
    # 1x lost to no KD at seed 0; 0.3x collapsed two of 10 seeds; 0.1x tied), docs/benchmarks.md.
    params = {
        "pixel": Param(
            "bool",
            False,
            published=True,
            help="pixel-level (feature) KD on the background (released: on; off by default: on UCAS-AOD it ties "
            "the student alone at 0.1x the detection loss and lowers it at 0.3x, docs/benchmarks.md)",
        ),
        "logit": Param("bool", True, help="logit-level KD on the selected negatives (ncs)"),
        "box": Param(
            "bool",
            False,
            published=True,
            help="box-regression L1 towards the teacher's regressions on the selected samples (released: on; off "
            "by default: a negative's regression has no object to fit)",
        ),
        "angle": Param("bool", True, help="angle-bin NCKD with category direction estimation"),
        "part_balance": Param(
            "bool",
            False,
            help="under kd_balance auto, balance each part on its own, each an equal share of NSD's strength "
            "(false: the parts keep the released weights' proportions; on UCAS-AOD the pixel part's gradient is "
            "~70x the logit part's; balanced per part, 10 seeds: no better, docs/benchmarks.md)",
        ),
        "pixel_norm": Param(
            "choice",
            "none",
            choices=("none", "standardise"),
            published="none",
            help="pixel KD on the raw maps (released) or on maps standardised per channel (scale-free: the "
            "student cannot lower the term by rescaling its own features)",
        ),
        "fg_weight": Param("float", 0.0, 0.0, 12.0, help="pixel KD weight on GT foreground (released 0)"),
        "bg_weight": Param("float", 12.0, 1.0, 50.0, log=True, help="pixel KD weight on background (released 12)"),
        "logit_weight": Param("float", 1.8, 0.1, 10.0, log=True, help="logit KD weight (released 1.8)"),
        "box_weight": Param("float", 0.9, 0.1, 10.0, log=True, help="box L1 weight (released 0.9)"),
        "angle_weight": Param("float", 1.0, 0.1, 10.0, log=True, help="angle KD weight (released 1.0)"),
        "beta": Param("float", 8.0, 1.0, 16.0, help="NCKD beta for logit and angle KD (released 8)"),
        "temperature": Param("float", 4.0, 1.0, 8.0, help="temperature for logit and angle KD (released 4)"),
        "warmup_epochs": Param("float", 3.0, 0.0, 10.0, help="logit KD ramps up as min(epoch / E, 1); 0 = none"),
        "logit_form": Param(
            "choice",
            "binary",
            choices=("binary", "softmax"),
            published="softmax",
            help="logit KD: per-class binary KL (sigmoid heads) or the released softmax NCKD over the classes",
        ),
        "ncs": Param(
            "choice",
            "all",
            choices=("all", "topk", "threshold", "gap"),
            help="the negatives distilled: all (released use_sample='negn'), the teacher's hard negatives, the "
            "paper's core (topk, threshold), or where student and teacher disagree most (gap); on UCAS-AOD the "
            "logit part at 1x lifts the student on all negatives and lowers it on the core",
        ),
        "positives": Param(
            "bool",
            False,
            help="logit, box and angle KD also on the positive samples (released: negatives only)",
        ),
        "k": Param("int", 100, 10, 2000, log=True, help="negatives per image kept by ncs=topk or gap"),
        "threshold": Param("float", 0.05, 0.01, 0.5, log=True, help="teacher score above which ncs=threshold keeps"),
        "csl_sigma": Param("float", 1.0, 0.0, 4.0, help="circular smoothing of the teacher's angle bins (bins)"),
        "ce_mix": Param("float", 0.5, 0.0, 1.0, help="weight of the category direction prior in the angle target"),
        "adapter_init": adapter_init_param("released: N(0, 1e-4^2) weights"),
    }

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        on = [p for p in PARTS if hparams[p]]
        if not on:
            raise ValueError("KD method 'nsd' needs at least one of pixel, logit, box, angle switched on")
        if hparams["pixel"]:
            check_same_grid(cls.name, student, teacher)
        if hparams["logit"] or hparams["box"] or hparams["angle"]:
            check_same_anchors(cls.name, student, teacher)
        if hparams["logit"] and hparams["logit_form"] == "softmax" and student.num_classes < 2:
            raise ValueError(
                f"KD method 'nsd' with logit_form: softmax compares softmax distributions over the classes, but with "
                f"{student.num_classes} class the distribution is always 1 and the logit term identically 0; set "
                "nsd.logit_form: binary (per-class sigmoid KL) or nsd.logit: false"
            )
        if hparams["box"]:
            check_same_box_dim(cls.name, student, teacher, "box: true")
        if hparams["angle"]:
            for info, role in ((student, "student"), (teacher, "teacher")):
                if not info.oriented:
                    raise ValueError(
                        f"KD method 'nsd' with angle: true needs oriented boxes, but the {role} predicts horizontal "
                        "boxes; set nsd.angle: false to distil a horizontal-box detector"
                    )
                if info.angle_bins <= 0:
                    raise ValueError(
                        f"KD method 'nsd' with angle: true needs an angle classification branch (angle_bins > 0), "
                        f"which the {role} lacks; set nsd.angle: false or use a head with angle bins"
                    )
            if student.angle_bins != teacher.angle_bins:
                raise ValueError(
                    f"KD method 'nsd' with angle: true compares angle bins, but the student has "
                    f"{student.angle_bins} and the teacher {teacher.angle_bins}"
                )
            if student.angle_bins < 3:
                raise ValueError(
                    f"KD method 'nsd' with angle: true distils the angle bins other than the target bin, but with "
                    f"{student.angle_bins} angle bins one bin is left and the angle term is identically 0; "
                    "set nsd.angle: false or use at least 3 bins"
                )

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        if self.hparams["pixel"]:
            self.adapters = conv_adapters(student, teacher, kernel_size=3, init_std=1e-4)
            self.adapter_scale = AdapterScaleInit(self.hparams["adapter_init"])

    def balance_units(self) -> tuple[str, ...]:
        if not self.hparams["part_balance"]:
            return ()
        return tuple(part for part in ("pixel", "logit", "box", "angle") if self.hparams[part])

    def ramps(self, epoch: float) -> dict[str, float]:
        return {"logit": linear_ramp(epoch, self.hparams["warmup_epochs"])}  # min(epoch / E_warm, 1)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        terms: dict[str, Tensor] = {}
        if hp["pixel"]:
            fg_masks = foreground_masks(targets, student)
            self.adapter_scale(self.adapters, student.features, teacher.features)
            total = student.features[0].new_zeros(())
            for adapter, fs, ft, fg in zip(self.adapters, student.features, teacher.features, fg_masks):
                fs, ft = adapter(fs), ft.detach()
                if hp["pixel_norm"] == "standardise":
                    fs, ft = standardise(fs), standardise(ft)
                l_fg, l_bg = pixel_fg_bg_loss(fs, ft, fg)
                total = total + hp["fg_weight"] * l_fg + hp["bg_weight"] * l_bg  # pixel-level loss
            terms["pixel"] = total / len(fg_masks)  # (N2): mean over levels, as the released detector
        if not (hp["logit"] or hp["box"] or hp["angle"]):
            return terms

        zt, zs_all = teacher.flat_cls().detach(), student.flat_cls()
        assignment = _assignment(student, teacher)
        neg = assignment.neg_mask.to(zt.device)
        score = torch.sigmoid(zt)
        if hp["ncs"] == "gap":  # where the student's scores are furthest from the teacher's
            score = (torch.sigmoid(zs_all.detach()) - score).abs()
        mode = "topk" if hp["ncs"] == "gap" else hp["ncs"]
        sel = select_ncs(neg, score.amax(-1), mode, hp["k"], hp["threshold"])
        if hp["positives"]:
            sel = sel | assignment.pos_mask.to(sel.device)
        n = sel.sum().clamp(min=1)
        t = hp["temperature"]
        if hp["logit"]:
            zs = zs_all[sel]
            if hp["logit_form"] == "binary":
                kl = binary_kl(zs, zt[sel], t)
            else:
                kl = non_target_kd(zs, zt[sel], None, t)  # NCKD over the K classes
            terms["logit"] = hp["logit_weight"] * hp["beta"] * kl.sum() / n  # (N4); warm-up: ramps()
        if hp["box"]:
            bs, bt = student.flat_box()[sel], teacher.flat_box().detach()[sel]
            terms["box"] = hp["box_weight"] * (bs - bt).abs().sum() / (n * bs.shape[-1])  # (N5)
        if hp["angle"]:
            a = self.student_info.num_anchors
            if student.angle_logits is None or teacher.angle_logits is None:
                raise ValueError("KD method 'nsd' with angle: true got outputs without angle_logits")
            as_ = flatten_levels(student.angle_logits, a)[sel]
            at = flatten_levels([x.detach() for x in teacher.angle_logits], a)[sel]
            q = category_direction_target(at, zt[sel], t, hp["csl_sigma"], hp["ce_mix"])
            kl = non_target_kl_probs(q, as_, q.argmax(-1), t)
            terms["angle"] = hp["angle_weight"] * hp["beta"] * kl.sum() / n  # (N7)
        return terms
