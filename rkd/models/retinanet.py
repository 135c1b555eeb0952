"""RetinaNet head for oriented (le90) or horizontal boxes: anchors, focal loss, box loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from rkd.models.anchors import anchor_sizes, assign_batch, check_assign, grid_anchors
from rkd.models.angle_cls import csl_targets
from rkd.models.coders import make_coder, wrap_angle
from rkd.outputs import Assignment, DetectorOutput, Targets, flatten_levels


def conv_tower(channels: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class RetinaHead(nn.Module):
    """Classification and box subnets shared over pyramid levels, plus anchors and losses.

    Args:
        channels: FPN channels.
        num_classes: object classes (sigmoid per class, no background logit).
        box_dim: 5 (oriented, le90) or 4 (horizontal, xyxy).
        convs: 3x3 conv + ReLU layers in each subnet before its output conv.
        anchor_ratios: height / width of the anchors.
        anchor_scales: size multipliers of the anchors.
        anchor_size: anchor side (at scale 1, ratio 1) in units of the level's stride.
        prior: initial foreground probability of every class (focal-loss bias init).
        angle_bins: if > 0 (oriented boxes only), an angle-classification output of
            that many bins on the box subnet, trained with circular smooth labels
            (see :mod:`rkd.models.angle_cls`); boxes are still decoded from the
            regressed angle, the bins are auxiliary supervision and a KD signal.
        assign: which IoU picks positive / negative anchors of oriented boxes (see
            :mod:`rkd.models.anchors`): ``rotated`` (exact rotated IoU) or ``hbb`` (IoU with
            the GT's circumscribed horizontal box); the box target is the rotated GT either way.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        box_dim: int = 5,
        convs: int = 2,
        anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        anchor_scales: tuple[float, ...] = (1.0,),
        anchor_size: float = 4.0,
        prior: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        pos_iou: float = 0.5,
        neg_iou: float = 0.4,
        angle_bins: int = 0,
        assign: str = "rotated",
    ) -> None:
        super().__init__()
        self.num_classes, self.box_dim = num_classes, box_dim
        self.anchor_ratios, self.anchor_scales = tuple(anchor_ratios), tuple(anchor_scales)
        self.anchor_size = anchor_size
        self.num_anchors = len(self.anchor_ratios) * len(self.anchor_scales)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.pos_iou, self.neg_iou = pos_iou, neg_iou
        self.assign_rule = check_assign(assign)  # not `assign`: FCOSHead.assign is its assignment method
        self.coder = make_coder(box_dim)
        self.cls_tower = conv_tower(channels, convs)
        self.box_tower = conv_tower(channels, convs)
        self.cls_out = nn.Conv2d(channels, self.num_anchors * num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(channels, self.num_anchors * box_dim, 3, padding=1)
        if angle_bins and box_dim != 5:
            raise ValueError("angle_bins needs oriented boxes (box_dim 5)")
        self.angle_bins = angle_bins
        self.angle_out = nn.Conv2d(channels, self.num_anchors * angle_bins, 3, padding=1) if angle_bins else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # Start every class at probability `prior` so the many easy negatives do not swamp the first steps.
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior) / prior))
        if self.angle_out is not None:
            nn.init.constant_(self.angle_out.bias, -math.log((1 - prior) / prior))
        self._anchor_cache: dict[tuple, list[Tensor]] = {}

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        """Per level ``cls (B, A*K, H, W)``, ``box (B, A*D, H, W)`` and extras (``angle_logits``)."""
        cls = [self.cls_out(self.cls_tower(f)) for f in features]
        box_feats = [self.box_tower(f) for f in features]
        box = [self.box_out(f) for f in box_feats]
        extras = {"angle_logits": [self.angle_out(f) for f in box_feats]} if self.angle_out is not None else {}
        return cls, box, extras

    def anchors(self, features: list[Tensor], strides: tuple[int, ...]) -> list[Tensor]:
        """Anchors of each level, ``(H*W*A, box_dim)``, on the features' device (cached per shape)."""
        shapes = tuple(tuple(f.shape[-2:]) for f in features)
        key = (shapes, strides, features[0].device)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                grid_anchors(
                    h, w, s, anchor_sizes(self.anchor_size * s, self.anchor_ratios, self.anchor_scales), self.box_dim
                ).to(features[0].device)
                for (h, w), s in zip(shapes, strides)
            ]
        return self._anchor_cache[key]

    def decode_boxes(self, deltas: Tensor, anchors: Tensor, stride: int | None = None) -> Tensor:
        """Boxes from deltas and their anchors (``stride`` is unused: anchors carry their size)."""
        return self.coder.decode(deltas, anchors)

    def loss(self, output: DetectorOutput, targets: Targets) -> tuple[Assignment, dict[str, Tensor]]:
        """Focal loss over positives and negatives, smooth-L1 on positives' deltas; both / #positives."""
        cls = output.flat_cls()
        box = output.flat_box()
        anchors = output.flat_anchors()
        with torch.no_grad():
            asg = assign_batch(anchors, targets, self.pos_iou, self.neg_iou, self.assign_rule)
        pos, valid = asg.pos_mask, asg.pos_mask | asg.neg_mask
        num_pos = pos.sum().clamp(min=1).to(cls.dtype)
        onehot = F.one_hot(asg.matched_labels.clamp(min=0), self.num_classes).to(cls.dtype)
        onehot = onehot * pos[..., None].to(cls.dtype)
        cls_loss = (
            sigmoid_focal_loss(
                cls[valid], onehot[valid], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            / num_pos
        )
        b_idx, a_idx = pos.nonzero(as_tuple=True)
        target_deltas = self.coder.encode(asg.target_boxes[b_idx, a_idx], anchors[a_idx])
        box_loss = F.smooth_l1_loss(box[b_idx, a_idx], target_deltas, beta=1.0 / 9, reduction="sum") / num_pos
        losses = {"cls": cls_loss, "box": box_loss}
        if self.angle_bins:
            # The CSL target is the angle of the representation the box deltas use (anchor angle + da).
            angle_logits = flatten_levels(output.angle_logits, self.num_anchors)[b_idx, a_idx]
            target = csl_targets(wrap_angle(anchors[a_idx, 4] + target_deltas[:, 4]), self.angle_bins)
            bce = F.binary_cross_entropy_with_logits(angle_logits, target, reduction="none")
            losses["angle"] = bce.mean(dim=1).sum() / num_pos
        return asg, losses
