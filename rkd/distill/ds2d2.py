"""DS2D2: dual-stream spectral decoupling distillation (TGRS 2025, ``papers/001_*.txt``).

Two streams, both on the FPN features (student features first pass a per-level 1x1
bias-free adapter to the teacher's channels):

Explicit stream. A first-order 2-D DWT (:func:`rkd.distill.wavelets.dwt2`, any PyWavelets
basis; the released code uses Haar with zero padding) splits each level into the low band
``cL = LL`` and the high bands ``cH = (LH, HL, HH)``::

    L_exp = sum_l  w_L * mean((cL_s - cL_t)^2 * W)  +  w_H * mean((cH_s - cH_t)^2 * W)

(means over batch, channels, bands and wavelet-grid cells). ``W`` is the density-independent
scale weight (DISW)::

    W = 1 + sum_b 1 / (w_b * h_b) * [cell in footprint of box b]

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

    L_cls = sum BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta               (quality-focal form)
    L_box = sum_anchors max_c sigmoid(t) * |r_s - r_t|_1
    L_amp = (L_cls + L_box) / sum_anchors max_c sigmoid(t)

The paper's box term is GIoU on decoded boxes; a :class:`~rkd.outputs.DetectorOutput` carries
encoded regressions and no decoder, so rkd uses L1 on the encoded deltas with the same
teacher-score weighting. The teacher head must be frozen (``requires_grad=False``, as the
training layer sets it): gradients pass through it to the student but it is never updated.

Defaults: DIOR RetinaNet released weights (explicit 1e-5 / 1e-5, implicit 1 / 1, Haar). Note
the digest's ``mean`` normalisation of the explicit terms; with it those weights are small,
which is why the search ranges for ``w_low``/``w_high`` reach up to 1.

Terms: ``low``, ``high`` (explicit), ``ff``, ``hf`` (amplifiers, when enabled).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.distill.base import PRIOR_STAGE_OPTIONS, KDComponent, Param, number_option, register
from rkd.distill.masks import as_rotated, box_frame_coords
from rkd.distill.wavelets import check_wavelet, coefficient_centres, dwt2
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
    """DISW weight ``(B, 1, H', W')`` on the wavelet grid of a level (see the module doc).

    ``boxes``: per image ``(N, 5)`` le90 or ``(N, 4)`` xyxy in input pixels; ``feature_hw`` the
    level's feature size and ``stride`` its stride; the wavelet grid has ``H' x W'`` cells of
    ``2 * stride`` pixels (``H' = floor((H + L - 1) / 2)``). Built on ``device`` (default: the boxes').

    >>> w = disw_map([torch.tensor([[48.0, 48.0, 64.0, 32.0, 0.0]])], (8, 12), 8.0, "haar")
    >>> tuple(w.shape), float(w.sum() - w.numel()), float(w.max())  # a 4 x 2 cell box: 1/8 on 8 cells
    ((1, 1, 4, 6), 1.0, 1.125)
    """
    if device is None:
        device = boxes[0].device if boxes else torch.device("cpu")
    length = check_wavelet(wavelet).dec_len
    # coefficient centres in input pixels (feature cell i spans [i, i+1) * stride)
    cy = coefficient_centres(feature_hw[0], wavelet).to(device, torch.float32) * stride
    cx = coefficient_centres(feature_hw[1], wavelet).to(device, torch.float32) * stride
    gh, gw = cy.numel(), cx.numel()
    ys, xs = torch.meshgrid(cy, cx, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (G, 2)
    first = 2 - length / 2  # centre of coefficient 0, in feature cells
    cell = 2.0 * stride
    maps = []
    for b in boxes:  # per image; all boxes of the image at once
        if b.numel() == 0:
            maps.append(torch.ones(gh * gw, device=device))
            continue
        rb = as_rotated(b.to(device, torch.float32))
        u, v = box_frame_coords(points, rb)  # (G, N)
        inside = (u.abs() <= rb[:, 2] / 2) & (v.abs() <= rb[:, 3] / 2)
        kx = torch.round((rb[:, 0] / stride - first) / 2).clamp(0, gw - 1).long()
        ky = torch.round((rb[:, 1] / stride - first) / 2).clamp(0, gh - 1).long()
        inside[ky * gw + kx, torch.arange(rb.shape[0], device=device)] = True  # the cell nearest the centre
        area = (rb[:, 2] / cell) * (rb[:, 3] / cell)
        maps.append(1.0 + (inside.float() / area.clamp(min=1.0)).sum(dim=1))
    return torch.stack(maps).view(len(boxes), 1, gh, gw).to(dtype)


def explicit_loss(
    student: Tensor, teacher: Tensor, weight: Tensor | None, wavelet: str
) -> tuple[Tensor, Tensor]:
    """Unweighted ``(mean((cL_s-cL_t)^2 W), mean((cH_s-cH_t)^2 W))`` of one level.

    ``weight`` is the DISW map ``(B, 1, H', W')`` or ``None`` (all ones).

    >>> x = torch.randn(2, 3, 8, 8)
    >>> [float(t) for t in explicit_loss(x, x, None, "haar")]
    [0.0, 0.0]
    """
    return _explicit_from_bands(dwt2(student, wavelet), dwt2(teacher.detach(), wavelet), weight)


def _explicit_from_bands(
    student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    (ls, *hs), (lt, *ht) = student, teacher
    w = 1.0 if weight is None else weight
    low = ((ls - lt) ** 2 * w).mean()
    # the three high bands have one size: their joint mean is the mean of the three means
    high = sum(((s - t) ** 2 * w).mean() for s, t in zip(hs, ht)) / len(hs)
    return low, high


def amplifier_loss(cls_s: Tensor, box_s: Tensor, cls_t: Tensor, box_t: Tensor, beta: float = 1.0) -> Tensor:
    """Output distillation of one amplifier on flattened ``(B, N, K)`` logits and ``(B, N, D)`` deltas.

    ``(sum BCE(s, p_t) |sigmoid(s) - p_t|^beta + sum_n max_c p_t |r_s - r_t|_1) / max(1, sum_n max_c p_t)``
    with ``p_t = sigmoid(t)``.

    >>> z, r = torch.randn(1, 5, 3), torch.randn(1, 5, 4)
    >>> float(amplifier_loss(z, r, z, r))
    0.0
    """
    p_t = torch.sigmoid(cls_t.detach())
    focal = (torch.sigmoid(cls_s) - p_t).abs().pow(beta)
    cls_term = (F.binary_cross_entropy_with_logits(cls_s, p_t, reduction="none") * focal).sum()
    score = p_t.max(dim=-1).values  # (B, N)
    box_term = (score * (box_s - box_t.detach()).abs().sum(-1)).sum()
    return (cls_term + box_term) / score.sum().clamp(min=1.0)


def high_band(x: Tensor, wavelet: str) -> Tensor:
    """``LH + HL + HH`` of ``x`` resized (bilinear) back to ``x``'s spatial size."""
    return _high_from_bands(dwt2(x, wavelet), x.shape[-2:])


def _high_from_bands(bands: tuple[Tensor, ...], size: torch.Size) -> Tensor:
    _, lh, hl, hh = bands
    # Channels-last before resizing: the CPU's bilinear kernel is several times faster in that
    # layout, and the amplifier head runs channels-last anyway, so the full-size map is never
    # converted.
    high = (lh + hl + hh).contiguous(memory_format=torch.channels_last)
    return F.interpolate(high, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- modules


class HFHead(nn.Module):
    """The high-frequency amplifier: a small conv head, shared over levels, C -> (A*K, A*D) maps."""

    def __init__(self, channels: int, hidden: int, num_anchors: int, num_classes: int, box_dim: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.cls = nn.Conv2d(hidden, num_anchors * num_classes, 3, padding=1)
        self.box = nn.Conv2d(hidden, num_anchors * box_dim, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log(99.0))  # prior probability 0.01, as a RetinaNet head
        nn.init.zeros_(self.box.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls, box = [], []
        for f in feats:
            h = self.trunk(f)
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
        "hf_amplifier": Param("bool", True, help="distil through a head trained on the teacher's high bands"),
        "hf_weight": Param("float", 1.0, 0.1, 10.0, log=True, help="weight of the high-frequency amplifier"),
        "beta": Param("float", 1.0, 0.5, 2.0, help="exponent of the quality-focal factor |p_s - p_t|^beta"),
        "hf_channels": Param("int", 16, 8, 256, help="hidden channels of the high-frequency amplifier head"),
    }
    # prior_epochs, prior_lr: the HF head's training schedule. The paper does not size the HF
    # head; rkd's default is a narrow one trained longer, because the prior stage runs once per
    # search while the head runs at every distillation step. On UCAS-AOD (EfficientNet-Lite0
    # teacher, 64-channel FPN) 16 channels after 8 epochs fit the teacher's val outputs better
    # than 64 after 4 (prior-stage loss 0.508 vs 0.549; 64 after 8: 0.463) at about a third of
    # the amplifier's per-step cost (bench/ds2d2_hf_head.py, bench/kd_overhead.py).
    options = {
        **PRIOR_STAGE_OPTIONS,
        "prior_epochs": number_option("int", 8, low=1, help="epochs of the HF head's prior stage over the train split"),
    }
    has_prior_stage = True
    # What the cached HF head depends on besides the teacher and the data: its input bands
    # (wavelet), its size (hf_channels), its loss (beta) and its schedule.
    prior_stage_keys = ("wavelet", "hf_channels", "beta", "prior_epochs", "prior_lr")

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        if tuple(student.strides) != tuple(teacher.strides):
            raise ValueError(
                f"KD method 'ds2d2' compares feature maps location by location, but the student's strides "
                f"{list(student.strides)} differ from the teacher's {list(teacher.strides)}"
            )
        if hparams.get("hf_amplifier", True) and len(set(teacher.level_channels)) != 1:
            raise ValueError(
                "KD method 'ds2d2': the high-frequency amplifier is a head shared over levels and needs the "
                f"teacher's FPN levels to have equal channels, got {list(teacher.level_channels)}"
            )

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        type(self).check_models(student, teacher, self.hparams)
        self.adapters = nn.ModuleList(
            nn.Conv2d(cs, ct, 1, bias=False) for cs, ct in zip(student.level_channels, teacher.level_channels)
        )
        self.has_prior_stage = bool(self.hparams["hf_amplifier"])
        self.hf_head: HFHead | None = None
        if self.hparams["hf_amplifier"]:
            self.hf_head = HFHead(
                teacher.level_channels[0], self.hparams["hf_channels"], teacher.num_anchors, teacher.num_classes,
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
            bands = [high_band(f.detach(), wav) for f in teacher.features]
        cls, box = self.hf_head(bands)
        a = teacher.info.num_anchors
        return amplifier_loss(
            flatten_levels(cls, a), flatten_levels(box, a), teacher.flat_cls().detach(), teacher.flat_box().detach(),
            self.hparams["beta"],
        )

    # -- distillation

    def _frozen_hf(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        assert self.hf_head is not None
        params = {k: v.detach() for k, v in self.hf_head.named_parameters()}
        # channels-last convolutions are ~20% faster forward and backward here on the CPU
        # (and the usual layout on GPUs); the outputs are flattened per anchor either way
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        return torch.func.functional_call(self.hf_head, params, (feats,))

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        wav = hp["wavelet"]
        adapted = [a(f) for a, f in zip(self.adapters, student.features)]
        t_feats = [f.detach() for f in teacher.features]
        for lvl, (s, t) in enumerate(zip(adapted, t_feats)):
            if s.shape != t.shape:
                raise ValueError(
                    f"ds2d2: adapted student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
                    f"differ at level {lvl}"
                )
        # each level is transformed once; the HF amplifier reuses the bands of the explicit stream
        s_bands = [dwt2(s, wav) for s in adapted]
        with torch.no_grad():
            t_bands = [dwt2(t, wav) for t in t_feats]
        low, high = [], []
        for s, sb, tb, stride in zip(adapted, s_bands, t_bands, self.teacher_info.strides):
            weight = None
            if hp["disw"]:
                weight = disw_map(targets.boxes, tuple(s.shape[-2:]), float(stride), wav, s.dtype, s.device)
            lo, hi = _explicit_from_bands(sb, tb, weight)
            low.append(lo)
            high.append(hi)
        terms = {"low": hp["w_low"] * sum(low), "high": hp["w_high"] * sum(high)}
        a = teacher.info.num_anchors
        cls_t, box_t = teacher.flat_cls().detach(), teacher.flat_box().detach()
        if hp["ff_amplifier"]:
            if teacher.head_fn is None:
                raise ValueError("ds2d2: the full-frequency amplifier needs teacher_output.head_fn (the teacher head)")
            # channels-last: the head's convolutions ran ~12% faster forward and backward on the CPU
            cls_s, box_s = teacher.head_fn([s.contiguous(memory_format=torch.channels_last) for s in adapted])
            amp = amplifier_loss(flatten_levels(cls_s, a), flatten_levels(box_s, a), cls_t, box_t, hp["beta"])
            terms["ff"] = hp["ff_weight"] * amp
        if self.hf_head is not None:
            cls_s, box_s = self._frozen_hf([_high_from_bands(b, s.shape[-2:]) for b, s in zip(s_bands, adapted)])
            with torch.no_grad():
                cls_h, box_h = self._frozen_hf([_high_from_bands(b, t.shape[-2:]) for b, t in zip(t_bands, t_feats)])
            amp = amplifier_loss(
                flatten_levels(cls_s, a), flatten_levels(box_s, a), flatten_levels(cls_h, a),
                flatten_levels(box_h, a), hp["beta"],
            )
            terms["hf"] = hp["hf_weight"] * amp
        return terms


__all__ = ["DS2D2", "HFHead", "amplifier_loss", "disw_map", "explicit_loss", "high_band", "WAVELETS"]
