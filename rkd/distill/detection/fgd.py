"""FGD: focal and global knowledge distillation for detectors.

Z. Yang, Z. Li, X. Jiang, Y. Gong, Z. Yuan, D. Zhao, C. Yuan, "Focal and Global Knowledge
Distillation for Detectors", CVPR 2022, arXiv:2111.11837 (no DOI here). Per FPN
level, with ``F_s`` the student feature after the align conv (1x1, only where channels differ):

* masks from the GT boxes: ``M`` = 1 on every cell a box overlaps (oriented boxes, see ``masks.py``);
  scale mask ``S = 1 / (number of cells the box overlaps)`` on the box (the largest value
  where boxes overlap; eq. 3-4; the rotated analogue of the paper's ``1/(H_r W_r)``); the
  background mask ``(1 - M)`` normalised to sum 1 per image (released code);
* teacher attention ``A^S = HW softmax_{hw}(mean_c |F| / T)`` and ``A^C = C softmax_c(mean_{hw} |F| / T)`` (eq. 5-6);
* focal feature loss (eq. 7), sums divided by the batch size::

      L_fea = alpha * sum M S A^S_t A^C_t (F_t - F_s)^2 + beta * sum (1-M)_n A^S_t A^C_t (F_t - F_s)^2

* attention loss (eq. 8): ``L_at = gamma * (sum |A^S_t - A^S_s| + sum |A^C_t - A^C_s|)``;
* global loss (eq. 9-10): ``L_global = lambda * sum (R(F_t) - R(F_s))^2`` with ``R`` a
  GcBlock (context by a softmax-pooled 1x1 conv, then 1x1 -> LayerNorm -> ReLU -> 1x1 added
  back; separate blocks for student and teacher, both learnable, last conv zero-initialised).

Defaults (the authors' RetinaNet config, RetinaNet X101 -> R50): T 0.5, alpha 1e-3,
beta 5e-4, gamma 5e-4, lambda 5e-6. Terms: ``fg``, ``bg``, ``attn``, ``global`` (summed over levels).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.distill.base import Param, register
from rkd.distill.connectors import AlignedFeatureKD
from rkd.distill.masks import box_cells
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def spatial_attention(feature: Tensor, temperature: float) -> Tensor:
    """``(B, 1, H, W)``: ``H*W * softmax_{hw}(mean_c |F| / T)`` (eq. 5); sums to H*W per image."""
    b, _, h, w = feature.shape
    a = feature.abs().mean(1).flatten(1) / temperature
    return (h * w * F.softmax(a, dim=1)).view(b, 1, h, w)


def channel_attention(feature: Tensor, temperature: float) -> Tensor:
    """``(B, C, 1, 1)``: ``C * softmax_c(mean_{hw} |F| / T)`` (eq. 6); sums to C per image."""
    b, c = feature.shape[:2]
    a = feature.abs().mean((2, 3)) / temperature
    return (c * F.softmax(a, dim=1)).view(b, c, 1, 1)


def fgd_masks(targets: Targets, out: DetectorOutput) -> tuple[list[Tensor], list[Tensor]]:
    """Per level ``(B, 1, H, W)`` scale-weighted foreground and normalised background masks.

    Foreground: on each box's locations, ``1 / (its number of locations)``, maximum over
    overlapping boxes. Background: 1 elsewhere, divided by its count per image (0 if none).
    """
    touched, _, _ = box_cells(targets, out)  # (B, HW, M) per level: every cell a box overlaps
    fgs, bgs = [], []
    for inside, f in zip(touched, out.features):
        b, _, h, w = f.shape
        count = inside.sum(1, keepdim=True).clamp(min=1)
        fg = (inside / count).amax(-1)  # (B, HW): the scale mask S on the boxes (eq. 3-4)
        bg = (fg == 0).to(fg.dtype)
        bg = bg / bg.sum(1, keepdim=True).clamp(min=1)  # (1 - M) / N_bg off every box (eq. 3-4)
        fgs.append(fg.view(b, 1, h, w).to(f.dtype))
        bgs.append(bg.view(b, 1, h, w).to(f.dtype))
    return fgs, bgs


class GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet) as FGD uses it for the relation loss."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        weights = F.softmax(self.mask(x).view(b, 1, h * w), dim=-1)  # (B, 1, HW)
        context = torch.bmm(x.view(b, c, h * w), weights.transpose(1, 2)).view(b, c, 1, 1)
        return x + self.transform(context)  # R(F) of L_global (eq. 9-10)


def fgd_level_losses(
    fs: Tensor, ft: Tensor, fg: Tensor, bg: Tensor, temperature: float, gc_s: nn.Module, gc_t: nn.Module
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unweighted ``(fg, bg, attention, global)`` losses of one level, each divided by the batch size."""
    ft = ft.detach()
    b = fs.shape[0]
    s_t, c_t = spatial_attention(ft, temperature), channel_attention(ft, temperature)
    s_s, c_s = spatial_attention(fs, temperature), channel_attention(fs, temperature)
    d2 = (fs - ft) ** 2 * s_t * c_t
    l_fg = (d2 * fg).sum() / b  # eq. 7, foreground half
    l_bg = (d2 * bg).sum() / b  # eq. 7, background half
    l_at = ((c_s - c_t).abs().sum() + (s_s - s_t).abs().sum()) / b  # eq. 8
    l_gl = ((gc_t(ft) - gc_s(fs)) ** 2).sum() / b  # L_global (eq. 9-10)
    return l_fg, l_bg, l_at, l_gl


@register("fgd")
class FGD(AlignedFeatureKD):
    """Focal (fg/bg + attention) and global distillation of FPN features."""

    params = {
        "alpha": Param("float", 1e-3, 1e-5, 1e-1, log=True, help="foreground feature weight (released 1e-3)"),
        "beta": Param("float", 5e-4, 5e-6, 5e-2, log=True, help="background feature weight (released 5e-4)"),
        "gamma": Param("float", 5e-4, 5e-6, 5e-2, log=True, help="attention loss weight (released 5e-4)"),
        "lambda": Param("float", 5e-6, 5e-8, 5e-4, log=True, help="global loss weight (released 5e-6)"),
        "temperature": Param("float", 0.5, 0.1, 2.0, log=True, help="attention temperature (released 0.5)"),
    }

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)  # the align adapters
        self.gc_student = nn.ModuleList(GcBlock(c) for c in teacher.level_channels)
        self.gc_teacher = nn.ModuleList(GcBlock(c) for c in teacher.level_channels)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        fgs, bgs = fgd_masks(targets, student)
        sums = [0.0, 0.0, 0.0, 0.0]
        for lvl, (fs, ft) in enumerate(zip(student.features, teacher.features)):
            parts = fgd_level_losses(
                self.adapters[lvl](fs),
                ft,
                fgs[lvl],
                bgs[lvl],
                hp["temperature"],
                self.gc_student[lvl],
                self.gc_teacher[lvl],
            )
            sums = [acc + p for acc, p in zip(sums, parts)]
        return {
            "fg": hp["alpha"] * sums[0],
            "bg": hp["beta"] * sums[1],
            "attn": hp["gamma"] * sums[2],
            "global": hp["lambda"] * sums[3],
        }
