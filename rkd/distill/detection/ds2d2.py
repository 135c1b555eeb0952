"""DS2D2: dual-stream spectral decoupling distillation.

X. Gao, D. Zhao, B. Yuan, W. Li, "Dual-Stream Spectral Decoupling Distillation for Remote Sensing
Object Detection", IEEE Transactions on Geoscience and Remote Sensing 63, 2025,
DOI 10.1109/TGRS.2025.3600098 (arXiv:2512.04413); released code github.com/PolarAid/DS2D2
(``mmdet/models/distillation/ds2d2_retinanet.py``), whose defaults rkd uses. Only the paper's
abstract was available to this project, so the equation labels (D1)-(D6) below are this
module's own, not the paper's numbering.

Two streams, both on the FPN features (student features first pass a per-level 1x1
bias-free adapter to the teacher's channels):

Explicit stream. A first-order 2-D DWT (:func:`rkd.distill.wavelets.dwt2`, any PyWavelets
basis; the released code uses Haar with zero padding) splits each level into the low band
``cL = LL`` and the high bands ``cH = (LH, HL, HH)``::

    L_exp = sum_l  w_L * mean((cL_s - cL_t)^2 * W)  +  w_H * mean((cH_s - cH_t)^2 * W)        (D1)

(means over batch, channels, bands and wavelet-grid cells). ``W`` is the density-independent
scale weight (DISW)::

    W = 1 + sum_b 1 / (w_b * h_b) * [cell in footprint of box b]                              (D2)

with ``w_b, h_b`` the box size in wavelet-grid cells (one cell = 2 feature cells = 2 x stride
pixels), so every box adds a total of ~1 however small it is and however many share the
image. Footprint = the cells whose centre (:func:`rkd.distill.wavelets.coefficient_centres`)
lies in the oriented box, plus the cell nearest the box centre so a box smaller than a cell
still counts; the area is floored at one cell (a sub-cell box adds exactly 1 to one cell
instead of an unbounded weight on coarse levels - an rkd choice, the paper does not say).
Built on the device for all boxes of an image at once.

Implicit stream ("amplifiers": a head maps small feature differences to prediction
differences). Full-frequency amplifier: the frozen teacher head (``teacher.head_fn``) runs on
the adapted student features and its outputs are distilled towards the teacher's own outputs
(``teacher.cls_logits``/``box_regs``, i.e. the same head on the teacher features).
High-frequency amplifier: a small head trained in a prior stage to reproduce the teacher's
outputs from the teacher's high bands ``up(LH + HL + HH)`` (bilinear to the level's size);
during distillation it is frozen and applied to the high bands of adapted-student and teacher
features alike. Output loss for both amplifiers (RetinaNet form of the paper)::

    L_cls = sum BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta    (quality-focal form)  (D3)
    L_box = sum_anchors max_c sigmoid(t) * |r_s - r_t|_1                                     (D4)
    L_amp = (L_cls + L_box) / N,   N = sum_images max(1, positive anchors of the image)      (D5)

``N`` is the released code's ``avg_factor``: the positives of the student's own label assignment
(MMDetection's ``PseudoSampler`` counts at least one per image), summed over the batch; the
published amplifier weights (1 / 1 on DIOR) are relative to it. rkd reads it from
``student.assignment`` (else ``teacher.assignment``); a detector without one (the OpenMMLab
adapters) gets ``sum_images max(1, GT boxes)`` instead, the same scale (UCAS-AOD at 512 px:
1.8 positives per box). Not ``sum_anchors max_c sigmoid(t)``: that is about 0.01 x the anchors
on a fresh head, 12-27x the positives on UCAS-AOD, and shrank the published weights by as much.
The HF head's prior stage, which has no assignment, keeps ``max(1, sum_anchors max_c sigmoid(t))``:
its Adam steps do not depend on the loss scale, and the heads cached with it stay valid.

Faster R-CNN form of the full-frequency amplifier (``teacher.roi_head_fn`` present): the frozen
teacher RoI head runs on the adapted student features at the teacher's RoIs (its proposals: the
teacher's forward has no targets) and is distilled towards its own outputs on those RoIs, as the
released Faster R-CNN configuration does (KL at T 3 with weight 0.5, L1 on the teacher's
argmax-class deltas)::

    L_roi = 0.5 * T^2 * (1/R) sum_r KL(softmax(z_t,r / T) || softmax(z_s,r / T))
            + (1/R) sum_{r: k_r < K} |d_s,r[k_r] - d_t,r[k_r]|_1,    k_r = argmax_k z_t,r,  T = 3   (D6)

over the ``R`` RoIs of the batch (``K`` object classes plus background, last). The ``T^2`` factor
keeps the KL's gradient at the scale of T = 1 (Hinton et al.); the released code's normalisation
was not available to this project, and the loss balance sets the term's strength under ``kd_balance: auto``.
This form replaces the dense one for a two-stage teacher (its dense head is the RPN, whose
single objectness class is not the detector's prediction); the HF amplifier stays dense and
reproduces the teacher's RPN outputs (the paper does not give its two-stage form). The released
Faster R-CNN weights on DIOR are explicit 0.5 / 0.5 and implicit 1e-5 / 1e-5; rkd's declared
defaults (the ``published_defaults`` point) are the RetinaNet ones.

The paper's box term is GIoU on decoded boxes; a :class:`~rkd.outputs.DetectorOutput` carries
encoded regressions and no decoder, so rkd uses L1 on the encoded deltas with the same
teacher-score weighting. The teacher head must be frozen (``requires_grad=False``, as the
training layer sets it): gradients pass through it to the student but it is never updated.

Defaults: DIOR RetinaNet released weights (explicit 1e-5 / 1e-5, implicit 1 / 1, Haar), with the
high-frequency amplifier **off** (``hf_amplifier: false``; published: on). Measured on UCAS-AOD
(Lite0 teacher, convnet w0.5 student from scratch, 8 epochs, 3 seeds, ``docs/benchmarks.md``): with
it DS2D2 is below the student alone in every balance tried (-0.037 mAP50 at rkd's balance, -0.012
at the published weights), without it above on the mean (+0.014 at rkd's balance); on the same
seed the HF amplifier alone with the explicit stream (0.062) is far below the FF amplifier alone
(0.171). Searches may still switch it on (the ``ds2d2`` space has it as a choice), and the
published-defaults point runs it. The
explicit terms (D1) are means over their elements; with that normalisation the released weights
are small, which is why the search ranges for ``w_low``/``w_high`` reach up to 1.

Terms: ``low``, ``high`` (explicit), ``ff``, ``hf`` (amplifiers, when enabled).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.distill.base import PRIOR_STAGE_OPTIONS, KDComponent, Param, number_option, register
from rkd.distill.checks import check_same_grid, check_same_shapes
from rkd.distill.connectors import AdapterScaleInit, adapter_init_param, conv_adapters
from rkd.distill.functional import bce_values, softmax_kd
from rkd.distill.masks import as_rotated, box_frame_coords
from rkd.distill.wavelets import check_wavelet, coefficient_centres, dwt2_stacked
from rkd.outputs import DetectorInfo, DetectorOutput, Targets, flatten_levels

WAVELETS = ("haar", "db2", "db3", "db4", "sym2", "sym3", "sym4", "coif1", "coif2", "bior1.3", "bior2.2", "rbio2.2")


# ----------------------------------------------------------------------------- pure functions


def disw_map(
    boxes: list[Tensor],
    feature_hw: tuple[int, int],
    stride: float,
    wavelet: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """DISW weight (D2) ``(B, 1, H', W')`` on the wavelet grid of a level (see the module doc).

    ``boxes``: per image ``(N, 5)`` le90 or ``(N, 4)`` xyxy in input pixels; ``feature_hw`` the
    level's feature size and ``stride`` its stride; the wavelet grid has ``H' x W'`` cells of
    ``2 * stride`` pixels (``H' = floor((H + L - 1) / 2)``). Built on ``device`` (default: the boxes').

    >>> w = disw_map([torch.tensor([[48.0, 48.0, 64.0, 32.0, 0.0]])], (8, 12), 8.0, "haar")
    >>> tuple(w.shape), float(w.sum() - w.numel()), float(w.max())  # a 4 x 2 cell box: 1/8 on 8 cells
    ((1, 1, 4, 6), 1.0, 1.125)
    """
    return disw_maps(boxes, [feature_hw], [stride], wavelet, dtype, device)[0]


@functools.lru_cache(maxsize=32)
def _disw_grid(
    feature_hws: tuple[tuple[int, int], ...], strides: tuple[float, ...], wavelet: str, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, tuple[tuple[int, int], ...]]:
    """The wavelet-grid cells of all levels, built once per (sizes, strides, wavelet, device):
    centres ``(G, 2)`` in input pixels, per-level stride, grid height and width and first cell
    index ``(L,)``, the level of each cell ``(G,)``, the centre of coefficient 0 (in feature
    cells) and the grid sizes."""
    # as for the wavelet filters: normal tensors even when first built under inference_mode
    with torch.inference_mode(False), torch.no_grad():
        points, heights, widths, starts, counts = [], [], [], [], []
        for (h, w), stride in zip(feature_hws, strides):
            # coefficient centres in input pixels (feature cell i spans [i, i+1) * stride)
            cy = coefficient_centres(h, wavelet).to(device, torch.float32) * stride
            cx = coefficient_centres(w, wavelet).to(device, torch.float32) * stride
            ys, xs = torch.meshgrid(cy, cx, indexing="ij")
            points.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
            starts.append(sum(counts))
            heights.append(cy.numel())
            widths.append(cx.numel())
            counts.append(cy.numel() * cx.numel())
        level_of_cell = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
        return (
            torch.cat(points),
            torch.tensor(strides, device=device),
            torch.tensor(heights, device=device),
            torch.tensor(widths, device=device),
            torch.tensor(starts, device=device),
            level_of_cell,
            2 - check_wavelet(wavelet).dec_len / 2,
            tuple(zip(heights, widths)),
        )


def disw_maps(
    boxes: list[Tensor],
    feature_hws: list[tuple[int, int]],
    strides: list[float],
    wavelet: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """:func:`disw_map` of every level at once: one ``(B, 1, H'_l, W'_l)`` map per level.

    The cells of all levels are tested against an image's boxes together, so the cost is a
    handful of tensor ops per image, not per image and level.
    """
    if device is None:
        device = boxes[0].device if boxes else torch.device("cpu")
    sizes = tuple((int(h), int(w)) for h, w in feature_hws)
    grid = _disw_grid(sizes, tuple(float(st) for st in strides), wavelet, torch.device(device))
    all_points, stride_t, grid_h, grid_w, start, level_of_cell, first, grids = grid
    maps = []
    for b in boxes:  # per image; all boxes and all levels of the image at once
        if b.numel() == 0:
            maps.append(torch.ones(all_points.shape[0], device=device))
            continue
        rb = as_rotated(b.to(device, torch.float32))
        n = rb.shape[0]
        u, v = box_frame_coords(all_points, rb)  # (G, N)
        inside = (u.abs() <= rb[:, 2] / 2) & (v.abs() <= rb[:, 3] / 2)
        # per level, the cell nearest each box centre, so a box smaller than a cell still counts
        kx = torch.round((rb[None, :, 0] / stride_t[:, None] - first) / 2).clamp(min=0)
        ky = torch.round((rb[None, :, 1] / stride_t[:, None] - first) / 2).clamp(min=0)
        kx = torch.minimum(kx.long(), grid_w[:, None] - 1)
        ky = torch.minimum(ky.long(), grid_h[:, None] - 1)  # (L, N)
        nearest = start[:, None] + ky * grid_w[:, None] + kx
        inside[nearest, torch.arange(n, device=device).expand_as(nearest)] = True
        cell = 2.0 * stride_t[:, None]  # (L, 1): one cell = 2 feature cells
        area = (rb[:, 2] / cell) * (rb[:, 3] / cell)  # (L, N): box area in each level's cells
        maps.append(1.0 + (inside.float() * area.clamp(min=1.0).reciprocal()[level_of_cell]).sum(dim=1))
    weight = torch.stack(maps).to(dtype)  # (B, G)
    levels = weight.split([gh * gw for gh, gw in grids], dim=1)
    return [level.reshape(len(boxes), 1, gh, gw) for level, (gh, gw) in zip(levels, grids)]


def explicit_loss(student: Tensor, teacher: Tensor, weight: Tensor | None, wavelet: str) -> tuple[Tensor, Tensor]:
    """Unweighted ``(mean((cL_s-cL_t)^2 W), mean((cH_s-cH_t)^2 W))`` of one level (the two terms of (D1)).

    ``weight`` is the DISW map ``(B, 1, H', W')`` or ``None`` (all ones).

    >>> x = torch.randn(2, 3, 8, 8)
    >>> [float(t) for t in explicit_loss(x, x, None, "haar")]
    [0.0, 0.0]
    """
    low, high, _ = _explicit_from_bands(dwt2_stacked(student, wavelet), dwt2_stacked(teacher.detach(), wavelet), weight)
    return low, high


def _explicit_from_bands(
    student: Tensor, teacher: Tensor, weight: Tensor | None, with_high: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The two explicit terms from stacked bands ``(B, C, 4, H', W')`` (LL, LH, HL, HH), and the
    student's ``LH + HL + HH`` when ``with_high`` (else ``None``)."""
    per_band, student_high = _BandErrors.apply(student, teacher, weight, with_high)
    # the three high bands have one size: their joint mean is the mean of the three means
    return per_band[0], per_band[1:].mean(), student_high


class _BandErrors(torch.autograd.Function):
    """``mean((s - t)^2 W)`` per band of stacked bands, and optionally the student's ``LH + HL + HH``.

    One function for both because the explicit stream and the HF amplifier read the same student
    bands: the backward writes their gradient into one tensor (``2 (s - t) W / n`` per band, plus
    the high-band gradient on bands 1-3) instead of autograd's four elementwise passes, a
    zero-filled slice gradient and an accumulation, each over the full band tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student: Tensor, teacher: Tensor, weight: Tensor | None, with_high: bool
    ) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        weighted = student - teacher
        squared = weighted.square()
        if weight is not None:
            w = weight.unsqueeze(1)  # (B, 1, H', W') -> (B, 1, 1, H', W'): every band, every channel
            weighted = weighted.mul_(w)
            squared = squared.mul_(w)
        count = squared.numel() // squared.shape[2]
        per_band = squared.sum(dim=(0, 1, 3, 4)).div_(count)
        ctx.save_for_backward(weighted)
        ctx.count = count
        return per_band, (_high_sum(student) if with_high else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_band: Tensor | None, grad_high: Tensor | None):  # type: ignore[override]
        (weighted,) = ctx.saved_tensors
        if grad_band is None:
            grad = torch.zeros_like(weighted)
        else:
            grad = weighted * (grad_band * (2.0 / ctx.count)).view(1, 1, -1, 1, 1)
        if grad_high is not None:
            grad[:, :, 1:] += grad_high.unsqueeze(2)
        return grad, None, None, None


def amplifier_loss(
    cls_s: Tensor,
    box_s: Tensor,
    cls_t: Tensor,
    box_t: Tensor,
    beta: float = 1.0,
    avg_factor: Tensor | float | None = None,
) -> Tensor:
    """Output distillation (D3)-(D5) of one amplifier on flattened ``(B, N, K)`` logits and ``(B, N, D)`` deltas.

    ``(sum BCE(s, p_t) |sigmoid(s) - p_t|^beta + sum_n max_c p_t |r_s - r_t|_1) / avg_factor`` with
    ``p_t = sigmoid(t)``; ``avg_factor`` is the released normaliser (:func:`amplifier_avg_factor`),
    ``None`` divides by ``max(1, sum_n max_c p_t)`` (the prior stage, see the module doc).

    >>> z, r = torch.randn(1, 5, 3), torch.randn(1, 5, 4)
    >>> float(amplifier_loss(z, r, z, r))
    0.0
    """
    p_t = torch.sigmoid(cls_t.detach())
    cls_term = _QualityFocalBCE.apply(cls_s, p_t, float(beta))
    score = p_t.max(dim=-1).values  # (B, N)
    box_term = (score * (box_s - box_t.detach()).abs().sum(-1)).sum()
    if avg_factor is None:
        avg_factor = score.sum().clamp(min=1.0)
    return (cls_term + box_term) / avg_factor


ROI_TEMPERATURE = 3.0  # released Faster R-CNN form
ROI_KL_WEIGHT = 0.5


def roi_amplifier_loss(
    cls_s: Tensor,
    box_s: Tensor,
    cls_t: Tensor,
    box_t: Tensor,
    temperature: float = ROI_TEMPERATURE,
    kl_weight: float = ROI_KL_WEIGHT,
) -> Tensor:
    """The Faster R-CNN amplifier (D6) on ``(R, K + 1)`` RoI logits (background last) and ``(R, K * 4)``
    class-specific deltas (see the module doc): ``kl_weight * T^2 * mean KL + mean L1`` of the
    teacher's argmax-class deltas (0 on RoIs the teacher calls background).

    >>> z, d = torch.randn(6, 4), torch.randn(6, 12)
    >>> float(roi_amplifier_loss(z, d, z, d))
    0.0
    """
    r = cls_t.shape[0]
    if r == 0:  # no RoIs: nothing to distil (a mean over none would be NaN)
        return cls_s.sum() * 0.0 + box_s.sum() * 0.0
    cls_t, box_t = cls_t.detach(), box_t.detach()
    num_classes = cls_t.shape[1] - 1
    best = cls_t.argmax(dim=1)
    fg = (best < num_classes).nonzero(as_tuple=True)[0]
    cols = best[fg, None] * 4 + torch.arange(4, device=best.device)  # (F, 4): the class's delta columns
    l1 = (box_s[fg[:, None], cols] - box_t[fg[:, None], cols]).abs().sum() / r
    return kl_weight * softmax_kd(cls_s, cls_t, temperature) + l1


def amplifier_avg_factor(student: DetectorOutput, teacher: DetectorOutput, targets: Targets) -> Tensor | float:
    """The amplifiers' normaliser: ``sum_images max(1, positives)`` of the student's assignment, as the
    released code's ``avg_factor`` (else the teacher's; with neither, ``sum_images max(1, GT boxes)``).

    A tensor on the device when read from an assignment: no host synchronisation in the step.
    """
    assignment = student.assignment if student.assignment is not None else teacher.assignment
    if assignment is not None:
        return assignment.pos_mask.sum(dim=1).clamp(min=1).sum()
    return float(sum(max(1, int(b.shape[0])) for b in targets.boxes))


class _QualityFocalBCE(torch.autograd.Function):
    """``sum BCE(s, p) |sigmoid(s) - p|^beta`` with its gradient computed in the forward pass.

    ``d/ds = (q - p) |q - p|^beta + BCE beta |q - p|^(beta - 1) sign(q - p) q (1 - q)``, ``q = sigmoid(s)``;
    the second part is taken as 0 where ``q == p``, which autograd's ``pow`` turns into
    ``inf * 0 = nan`` for ``beta < 1`` (saturated logits make ``q == p`` exactly in float32).
    ``p`` is a constant target (the teacher's probabilities).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        q = torch.sigmoid(logits)
        delta = q - target
        bce = bce_values(logits, target)
        if beta == 1.0:
            focal = delta.abs()
            slope = delta.sign()  # d|delta|/d delta
        else:
            focal = delta.abs().pow_(beta)
            slope = torch.where(delta != 0, focal * beta / delta, 0.0)
        loss = (bce * focal).sum()
        grad = delta.mul_(focal).add_(bce.mul_(slope).mul_(q * (1.0 - q)))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def high_bands(x: Tensor, wavelet: str) -> Tensor:
    """``LH + HL + HH`` of ``x`` at the wavelet grid's size (the HF amplifier's input before resizing)."""
    return _high_sum(dwt2_stacked(x, wavelet))


def _high_sum(bands: Tensor) -> Tensor:
    return bands[:, :, 1:].sum(dim=2)


# ----------------------------------------------------------------------------- modules


class HFHead(nn.Module):
    """The high-frequency amplifier: a small conv head, shared over levels, on ``up(LH + HL + HH)``.

    ``reduce`` (1x1, C -> hidden) -> bilinear resize to the level's size -> ReLU -> two 3x3 convs
    with ReLU -> 3x3 ``cls`` (A*K) and ``box`` (A*D) maps. A 1x1 convolution commutes with a
    per-channel bilinear resize (the bias too: the resize weights sum to one), so ``reduce`` runs
    on the bands at the wavelet grid's resolution and only ``hidden`` channels are resized: the
    head is a function of the resized high bands, as in the paper, computed at about half the
    cost of a 3x3 first layer on the full-size C-channel map.

    >>> head = HFHead(8, 4, num_anchors=2, num_classes=3, box_dim=5)
    >>> cls, box = head([torch.randn(1, 8, 5, 6)], [(10, 12)])
    >>> tuple(cls[0].shape), tuple(box[0].shape)
    ((1, 6, 10, 12), (1, 10, 10, 12))
    """

    def __init__(self, channels: int, hidden: int, num_anchors: int, num_classes: int, box_dim: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.trunk = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Conv2d(hidden, num_anchors * num_classes, 3, padding=1)
        self.box = nn.Conv2d(hidden, num_anchors * box_dim, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log(99.0))  # prior probability 0.01, as a RetinaNet head
        nn.init.zeros_(self.box.bias)

    def forward(self, highs: list[Tensor], sizes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """``highs``: per level ``LH + HL + HH`` ``(B, C, H', W')``; ``sizes``: the levels' ``(H, W)``."""
        cls, box = [], []
        for high, size in zip(highs, sizes):
            # channels-last from here: the CPU's bilinear kernel is several times faster in that
            # layout, and so are the 3x3 convolutions (the usual layout on GPUs too)
            reduced = self.reduce(high).contiguous(memory_format=torch.channels_last)
            h = self.trunk(F.interpolate(reduced, size=size, mode="bilinear", align_corners=False))
            cls.append(self.cls(h))
            box.append(self.box(h))
        return cls, box


@register("ds2d2")
class DS2D2(KDComponent):
    """Dual-stream spectral decoupling distillation; terms ``low``, ``high``, ``ff``, ``hf``."""

    params = {
        "wavelet": Param("choice", "haar", choices=WAVELETS, help="PyWavelets basis of the DWT (released: haar)"),
        "w_low": Param("float", 1e-5, 1e-6, 1.0, log=True, help="weight of the low band (DIOR RetinaNet: 1e-5)"),
        "w_high": Param("float", 1e-5, 1e-6, 1.0, log=True, help="weight of the high bands (DIOR RetinaNet: 1e-5)"),
        "disw": Param("bool", True, help="weight the explicit stream by the density-independent scale weight"),
        "ff_amplifier": Param("bool", True, help="distil the teacher head's outputs on adapted student features"),
        "ff_weight": Param("float", 1.0, 0.1, 10.0, log=True, help="weight of the full-frequency amplifier"),
        # off by default: measured on UCAS-AOD it is what pulled DS2D2 below the student alone (see the module doc)
        "hf_amplifier": Param(
            "bool",
            False,
            published=True,
            help="distil through a head trained on the teacher's high bands (released: on)",
        ),
        "hf_weight": Param("float", 1.0, 0.1, 10.0, log=True, help="weight of the high-frequency amplifier"),
        "beta": Param("float", 1.0, 0.5, 2.0, help="exponent of the quality-focal factor |p_s - p_t|^beta"),
        "hf_channels": Param("int", 16, 8, 256, help="hidden channels of the high-frequency amplifier head"),
        "adapter_init": adapter_init_param("released: PyTorch's default init"),
    }
    # prior_epochs, prior_lr: the HF head's training schedule. The paper does not size the HF
    # head; rkd's default is a narrow one trained longer, because the prior stage runs once per
    # search while the head runs at every distillation step. On UCAS-AOD (EfficientNet-Lite0
    # teacher, 64-channel FPN) 16 channels after 8 epochs fit the teacher's val outputs as well
    # as 64 after 4 (prior-stage loss 0.475 vs 0.474; 64 after 8: 0.450) with about a tenth of
    # the head's per-step multiply-adds (bench/ds2d2_hf_head.py, bench/kd_overhead.py).
    options = {
        **PRIOR_STAGE_OPTIONS,
        "prior_epochs": number_option("int", 8, low=1, help="epochs of the HF head's prior stage over the train split"),
    }
    has_prior_stage = True
    # What the cached HF head depends on besides the teacher and the data: its input bands
    # (wavelet), its size (hf_channels), its loss (beta) and its schedule.
    prior_stage_keys = ("wavelet", "hf_channels", "beta", "prior_epochs", "prior_lr")
    # The HF head's layout, in the cache key too: heads cached by an rkd whose HFHead had other
    # layers (before 2: a 3x3 first layer) must be trained again, not loaded.
    hf_head_layout = 2

    def prior_stage_config(self) -> dict[str, Any]:
        return {**super().prior_stage_config(), "hf_head_layout": self.hf_head_layout}

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        check_same_grid(cls.name, student, teacher)
        if hparams.get("hf_amplifier", True) and len(set(teacher.level_channels)) != 1:
            raise ValueError(
                "KD method 'ds2d2': the high-frequency amplifier is a head shared over levels and needs the "
                f"teacher's FPN levels to have equal channels, got {list(teacher.level_channels)}"
            )

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        type(self).check_models(student, teacher, self.hparams)
        self.adapters = conv_adapters(student, teacher, kernel_size=1, bias=False)
        # the full-frequency amplifier runs the teacher's head on the adapted features: they must
        # arrive at the teacher's scale (measured on UCAS-AOD: without it the amplifier loss stayed flat)
        self.adapter_scale = AdapterScaleInit(self.hparams["adapter_init"])
        self.has_prior_stage = bool(self.hparams["hf_amplifier"])
        self.hf_head: HFHead | None = None
        if self.hparams["hf_amplifier"]:
            self.hf_head = HFHead(
                teacher.level_channels[0],
                self.hparams["hf_channels"],
                teacher.num_anchors,
                teacher.num_classes,
                teacher.box_dim,
            )

    # -- prior stage: train the high-frequency amplifier on the teacher alone

    def prior_stage_modules(self) -> nn.Module | None:
        return self.hf_head

    def prior_stage_loss(self, teacher: DetectorOutput, targets: Targets) -> Tensor:
        """Train the HF head to reproduce the teacher's outputs from the teacher's high bands."""
        if self.hf_head is None:
            raise NotImplementedError("ds2d2 has no prior stage when hf_amplifier is false")
        wav = self.hparams["wavelet"]
        with torch.no_grad():
            highs = [high_bands(f.detach(), wav) for f in teacher.features]
        cls, box = self.hf_head(highs, [tuple(f.shape[-2:]) for f in teacher.features])
        a = teacher.info.num_anchors
        return amplifier_loss(
            flatten_levels(cls, a),
            flatten_levels(box, a),
            teacher.flat_cls().detach(),
            teacher.flat_box().detach(),
            self.hparams["beta"],
        )

    # -- distillation

    def _frozen_hf(self, highs: list[Tensor], sizes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        assert self.hf_head is not None
        params = {k: v.detach() for k, v in self.hf_head.named_parameters()}
        return torch.func.functional_call(self.hf_head, params, (highs, sizes))

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        wav = hp["wavelet"]
        self.adapter_scale(self.adapters, student.features, teacher.features)
        adapted = [a(f) for a, f in zip(self.adapters, student.features)]
        t_feats = [f.detach() for f in teacher.features]
        check_same_shapes(self.name, adapted, t_feats)
        # each level is transformed once; the HF amplifier reuses the bands of the explicit stream
        s_bands = [dwt2_stacked(s, wav) for s in adapted]
        with torch.no_grad():
            t_bands = [dwt2_stacked(t, wav) for t in t_feats]
        sizes = [(s.shape[-2], s.shape[-1]) for s in adapted]
        weights: list[Tensor | None] = [None] * len(adapted)
        if hp["disw"]:
            strides = [float(st) for st in self.teacher_info.strides]
            weights = list(disw_maps(targets.boxes, sizes, strides, wav, adapted[0].dtype, adapted[0].device))
        low, high, s_highs = [], [], []
        for sb, tb, weight in zip(s_bands, t_bands, weights):
            lo, hi, s_high = _explicit_from_bands(sb, tb, weight, with_high=self.hf_head is not None)
            low.append(lo)
            high.append(hi)
            s_highs.append(s_high)
        terms = {"low": hp["w_low"] * sum(low), "high": hp["w_high"] * sum(high)}  # (D1)
        a = teacher.info.num_anchors
        if (hp["ff_amplifier"] and teacher.roi_head_fn is None) or self.hf_head is not None:
            avg_factor = amplifier_avg_factor(student, teacher, targets)
        if hp["ff_amplifier"] and teacher.roi_head_fn is not None:
            # two-stage teacher: its RoI head on the adapted student features at the teacher's RoIs
            if teacher.roi_cls_logits is None or teacher.roi_box_deltas is None:
                raise ValueError("ds2d2: a two-stage teacher's output needs roi_cls_logits and roi_box_deltas")
            cls_s, box_s = teacher.roi_head_fn(adapted, [r.detach() for r in teacher.rois])
            amp = roi_amplifier_loss(cls_s, box_s, teacher.roi_cls_logits, teacher.roi_box_deltas)
            terms["ff"] = hp["ff_weight"] * amp
        elif hp["ff_amplifier"]:
            if teacher.head_fn is None:
                raise ValueError("ds2d2: the full-frequency amplifier needs teacher_output.head_fn (the teacher head)")
            cls_t, box_t = teacher.flat_cls().detach(), teacher.flat_box().detach()  # only this amplifier reads them
            # channels-last: the head's convolutions ran ~12% faster forward and backward on the CPU
            cls_s, box_s = teacher.head_fn([s.contiguous(memory_format=torch.channels_last) for s in adapted])
            amp = amplifier_loss(
                flatten_levels(cls_s, a), flatten_levels(box_s, a), cls_t, box_t, hp["beta"], avg_factor
            )
            terms["ff"] = hp["ff_weight"] * amp
        if self.hf_head is not None:
            cls_s, box_s = self._frozen_hf(s_highs, sizes)
            with torch.no_grad():
                cls_h, box_h = self._frozen_hf([_high_sum(b) for b in t_bands], sizes)
            amp = amplifier_loss(
                flatten_levels(cls_s, a),
                flatten_levels(box_s, a),
                flatten_levels(cls_h, a),
                flatten_levels(box_h, a),
                hp["beta"],
                avg_factor,
            )
            terms["hf"] = hp["hf_weight"] * amp
        return terms


__all__ = [
    "DS2D2",
    "HFHead",
    "amplifier_avg_factor",
    "amplifier_loss",
    "disw_map",
    "disw_maps",
    "explicit_loss",
    "high_bands",
    "roi_amplifier_loss",
    "WAVELETS",
]
