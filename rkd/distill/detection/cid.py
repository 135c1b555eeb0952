"""CID + Light-ML: centerness-based instance-aware distillation with task-wise mutual lifting.

B. Du, Z. Liao, Y. Zhang, Z. Cai, J. Chen, D. Huang, "Centerness-based Instance-aware Knowledge
Distillation with Task-wise Mutual Lifting for Object Detection on Drone Imagery", arXiv:2411.02861,
2024 (preprint, no DOI; no public code). Only the abstract is on file, so the equation numbers
(1)-(4) are this module's own, for the formulas below, rebuilt from the method's description.

(1) Instance mask. For GT box ``r`` and a location whose centre has box-frame coordinates
    ``(u, v)``, ``l, r = w/2 +- u`` and ``t, b = h/2 +- v``; the FCOS centerness
    ``c_r = sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` inside the box (0 outside) is raised
    to ``gamma`` (``center_exp``) and normalised per instance over all levels::

        M = sum_r c_r^gamma / sum_{levels, locations} c_r^gamma

    so every instance contributes a total weight of 1 and the mask of a batch sums to its
    number of instances ``N_ins`` (those covering at least one location).

(2) Feature KD (per level adapter ``phi``, 1x1 conv)::

        L_feat = w_f / N_ins * sum_l sum_{b,h,w} M * mean_c (phi(F_s) - F_t)^2

(3) Light-ML (student side only, before each task's KD): the class map ``C`` and the
    regression map ``R`` of the student lift each other through gated 1x1 convs::

        C' = C + sigmoid(G_c [C, R]) * P_c(R),     R' = R + sigmoid(G_r [C, R]) * P_r(C)

    with the lifting convs ``P`` initialised to zero (the module starts as the identity).
    It is shared across levels, trains with the student and is dropped at export.

(4) Head KD with the same mask::

        L_cls = w_c / N_ins * sum M * mean_{a,k} BCE(sigmoid(C'_s), sigmoid(C_t))
        L_reg = w_r / N_ins * sum M * mean_{a,d} |R'_s - R_t|

Defaults (weights 1, gamma 1) are rkd's choices: the paper gives no public values; every
term is a per-instance average of a per-element loss, so weight 1 keeps each O(1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rkd.distill.base import KDComponent, Param, register
from rkd.distill.checks import check_same_anchors, check_same_box_dim, check_same_grid
from rkd.distill.connectors import conv_adapters
from rkd.distill.functional import binary_kl_with_logits
from rkd.distill.masks import centerness_instance_masks
from rkd.outputs import DetectorInfo, DetectorOutput, Targets


def masked_location_loss(per_element: Tensor, mask: Tensor) -> Tensor:
    """``sum_{b,h,w} mask * mean_c per_element`` for ``(B, C, H, W)`` losses and a ``(B, 1, H, W)`` mask.

    >>> masked_location_loss(torch.ones(1, 4, 1, 2), torch.tensor([[[[0.5, 0.25]]]])).item()
    0.75
    """
    return (per_element.mean(1, keepdim=True) * mask).sum()


class LightML(nn.Module):
    """Task-wise mutual lifting between a head's class and regression maps (eq. 3)."""

    def __init__(self, cls_channels: int, reg_channels: int) -> None:
        super().__init__()
        both = cls_channels + reg_channels
        self.gate_cls = nn.Conv2d(both, cls_channels, 1)
        self.gate_reg = nn.Conv2d(both, reg_channels, 1)
        self.lift_cls = nn.Conv2d(reg_channels, cls_channels, 1)  # regression -> class
        self.lift_reg = nn.Conv2d(cls_channels, reg_channels, 1)  # class -> regression
        for conv in (self.lift_cls, self.lift_reg):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, cls: Tensor, reg: Tensor) -> tuple[Tensor, Tensor]:
        both = torch.cat([cls, reg], dim=1)
        cls_out = cls + torch.sigmoid(self.gate_cls(both)) * self.lift_cls(reg)
        reg_out = reg + torch.sigmoid(self.gate_reg(both)) * self.lift_reg(cls)
        return cls_out, reg_out


@register("cid")
class CID(KDComponent):
    """Centerness-weighted feature and head KD with Light-ML; terms ``feat``, ``cls``, ``reg``."""

    params = {
        "feat": Param("bool", True, help="centerness-weighted feature KD"),
        "head": Param("bool", True, help="centerness-weighted head (cls + reg) KD"),
        "lightml": Param("bool", True, help="lift the student's cls/reg maps with Light-ML before head KD"),
        "feat_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the feature term"),
        "cls_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the classification term"),
        "reg_weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the regression term"),
        "center_exp": Param("float", 1.0, 0.25, 4.0, log=True, help="exponent gamma on the FCOS centerness"),
    }

    @classmethod
    def check_models(cls, student: DetectorInfo, teacher: DetectorInfo, hparams: dict[str, Any]) -> None:
        if not (hparams["feat"] or hparams["head"]):
            raise ValueError("KD method 'cid' needs feat or head switched on")
        check_same_grid(cls.name, student, teacher)
        if hparams["head"]:
            check_same_anchors(cls.name, student, teacher)
            check_same_box_dim(cls.name, student, teacher, "head: true")

    def __init__(self, student: DetectorInfo, teacher: DetectorInfo, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        if self.hparams["feat"]:
            self.adapters = conv_adapters(student, teacher, kernel_size=1)
        # Light-ML only acts on head KD; without it there is nothing to lift.
        if self.hparams["head"] and self.hparams["lightml"]:
            a = student.num_anchors
            self.lightml = LightML(a * student.num_classes, a * student.box_dim)

    def forward(
        self, student: DetectorOutput, teacher: DetectorOutput, targets: Targets, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        hp = self.hparams
        masks = centerness_instance_masks(targets, student, hp["center_exp"])  # eq. 1
        n_ins = torch.stack([m.sum() for m in masks]).sum().detach().clamp(min=1.0)
        terms: dict[str, Tensor] = {}
        if hp["feat"]:  # eq. 2
            total = sum(
                masked_location_loss((a(fs) - ft.detach()) ** 2, m)
                for a, fs, ft, m in zip(self.adapters, student.features, teacher.features, masks)
            )
            terms["feat"] = hp["feat_weight"] * total / n_ins
        if hp["head"]:
            cls_total, reg_total = 0.0, 0.0
            for cs, rs, ct, rt, m in zip(
                student.cls_logits, student.box_regs, teacher.cls_logits, teacher.box_regs, masks
            ):
                if hasattr(self, "lightml"):
                    cs, rs = self.lightml(cs, rs)  # eq. 3
                bce = binary_kl_with_logits(cs, ct)  # the BCE's gradient, 0 at a match (see functional)
                cls_total = cls_total + masked_location_loss(bce, m)  # eq. 4
                reg_total = reg_total + masked_location_loss((rs - rt.detach()).abs(), m)
            terms["cls"] = hp["cls_weight"] * cls_total / n_ins
            terms["reg"] = hp["reg_weight"] * reg_total / n_ins
        return terms
