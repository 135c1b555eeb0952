"""Two-stage Faster R-CNN for horizontal ``(x1, y1, x2, y2)`` boxes on the same backbone + FPN.

Stage one, the RPN (:class:`RPNHead`), is a dense head like RetinaNet's with a
single "object" class: per level a shared 3x3 conv tower, then 1x1 convs for
objectness ``(B, A, H, W)`` and box deltas ``(B, A*4, H, W)`` against horizontal
anchors. Its best proposals per level are decoded, clipped to the image and
thinned by NMS. Stage two (:class:`RoIHead`) pools each proposal from the
pyramid level its size selects (RoIAlign), runs two FC layers and predicts
``K + 1`` class logits and class-specific box deltas.

What a :class:`TwoStageOutput` holds, exactly:

* ``cls_logits`` / ``box_regs`` / ``anchors`` / ``assignment`` are the RPN's, so
  every dense-map consumer (KD methods, ``flat_cls``) reads consistent shapes:
  ``info.num_classes == 1`` (objectness is class 0, a sigmoid logit),
  ``info.box_dim == 4``; the assignment is max-IoU at 0.7 / 0.3 with
  ``matched_labels == 0`` on positives. The object class count is
  ``output.num_object_classes`` (and ``FasterRCNN.num_classes``).
* ``rois``: per image ``(R_i, 4)`` boxes in input pixels: the sampled training
  RoIs (proposals plus the GT boxes) when targets are given, else the proposals.
* ``roi_cls_logits (R, K + 1)``: columns ``0..K-1`` are the object classes in rkd's
  label order, column ``K`` is background (softmax over all ``K + 1``).
* ``roi_box_deltas (R, K * 4)``: class ``k``'s deltas in columns ``4k..4k+3``, the
  :class:`~rkd.models.coders.HbbCoder` deltas relative to the RoI scaled by
  ``ROI_DELTA_SCALE`` (10, 10, 5, 5) so they have roughly unit spread.
* ``roi_batch_index (R,)``: the image of each RoI; ``R = sum(R_i)``.
* ``losses``: ``rpn_cls`` (BCE over sampled anchors), ``rpn_box`` (smooth-L1 on
  sampled positives), ``roi_cls`` (cross-entropy over sampled RoIs),
  ``roi_box`` (smooth-L1 of the GT class's deltas on foreground RoIs).

Oriented two-stage detectors are not built here: they come via the OpenMMLab adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, remove_small_boxes, roi_align

from rkd.models.anchors import anchor_sizes, assign_batch, grid_anchors
from rkd.models.coders import HbbCoder
from rkd.models.detector import Detector, own_targets
from rkd.models.retinanet import conv_tower
from rkd.outputs import Assignment, DetectorOutput, Targets

ROI_DELTA_SCALE = (10.0, 10.0, 5.0, 5.0)  # the usual RoI-head target weights: centre deltas are small


@dataclass
class TwoStageOutput(DetectorOutput):
    """:class:`~rkd.outputs.DetectorOutput` of the RPN plus the RoI head's outputs (see module doc)."""

    # rois, roi_cls_logits, roi_box_deltas, roi_batch_index, roi_head_fn: DetectorOutput's, what KD may read
    roi_labels: Tensor | None = None  # (R,) training targets of the sampled RoIs (K = background)
    num_object_classes: int = 0


def subsample(pos: Tensor, neg: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """Random indices of at most ``num * pos_fraction`` positives, negatives filling up to ``num``."""
    pos_idx, neg_idx = pos.nonzero(as_tuple=True)[0], neg.nonzero(as_tuple=True)[0]
    n_pos = min(int(num * pos_fraction), pos_idx.numel())
    n_neg = min(num - n_pos, neg_idx.numel())
    pos_idx = pos_idx[torch.randperm(pos_idx.numel(), device=pos.device)[:n_pos]]
    neg_idx = neg_idx[torch.randperm(neg_idx.numel(), device=neg.device)[:n_neg]]
    return pos_idx, neg_idx


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    h, w = image_size
    return torch.stack(
        [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
        dim=-1,
    )


class RPNHead(nn.Module):
    """Region proposal network: a dense head with one "object" class over horizontal anchors.

    Anchors are ``anchor_size * stride`` at scale 1, ratio 1 (as in RetinaNet).
    Training samples ``samples`` anchors per image, at most half positive (IoU >= 0.7,
    or a GT's best anchor), negatives below 0.3.
    """

    num_classes = 1
    box_dim = 4

    def __init__(
        self,
        channels: int,
        convs: int = 1,
        anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        anchor_scales: tuple[float, ...] = (1.0, 2.0),
        anchor_size: float = 2.0,
        samples: int = 256,
        pos_iou: float = 0.7,
        neg_iou: float = 0.3,
    ) -> None:
        super().__init__()
        self.anchor_ratios, self.anchor_scales = tuple(anchor_ratios), tuple(anchor_scales)
        self.anchor_size = anchor_size
        self.num_anchors = len(self.anchor_ratios) * len(self.anchor_scales)
        self.samples, self.pos_iou, self.neg_iou = samples, pos_iou, neg_iou
        self.coder = HbbCoder()
        self.tower = conv_tower(channels, convs)
        self.cls_out = nn.Conv2d(channels, self.num_anchors, 1)
        self.box_out = nn.Conv2d(channels, self.num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self._anchor_cache: dict[tuple, list[Tensor]] = {}

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        towers = [self.tower(f) for f in features]
        return [self.cls_out(t) for t in towers], [self.box_out(t) for t in towers], {}

    def anchors(self, features: list[Tensor], strides: tuple[int, ...]) -> list[Tensor]:
        shapes = tuple(tuple(f.shape[-2:]) for f in features)
        key = (shapes, strides, features[0].device)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                grid_anchors(h, w, s, anchor_sizes(self.anchor_size * s, self.anchor_ratios, self.anchor_scales), 4).to(
                    features[0].device
                )
                for (h, w), s in zip(shapes, strides)
            ]
        return self._anchor_cache[key]

    def decode_boxes(self, deltas: Tensor, anchors: Tensor, stride: int | None = None) -> Tensor:
        return self.coder.decode(deltas, anchors)

    @torch.no_grad()
    def proposals(
        self, output: DetectorOutput, pre_nms_top_k: int, post_nms_top_k: int, nms_iou: float = 0.7
    ) -> list[Tensor]:
        """Per image ``(R_i, 4)`` proposals: the best ``pre_nms_top_k`` anchors per level, clipped, NMS'd per level."""
        obj, deltas, anchors = output.flat_cls()[..., 0], output.flat_box(), output.flat_anchors()
        picks, levels, start = [], [], 0
        for lvl, n in enumerate(output.level_sizes()):
            top = obj[:, start : start + n].topk(min(pre_nms_top_k, n), dim=1).indices + start
            picks.append(top)
            levels.append(torch.full((top.shape[1],), lvl, device=obj.device))
            start += n
        idx, level = torch.cat(picks, dim=1), torch.cat(levels)
        scores = obj.gather(1, idx)
        picked_deltas = deltas.gather(1, idx[..., None].expand(-1, -1, 4))
        boxes = clip_boxes(self.coder.decode(picked_deltas, anchors[idx]), output.image_size)
        out = []
        for b, s in zip(boxes, scores):
            keep = remove_small_boxes(b, 1e-3)
            keep = keep[batched_nms(b[keep], s[keep], level[keep], nms_iou)][:post_nms_top_k]  # sorted by score
            out.append(b[keep])
        return out

    def loss(self, output: DetectorOutput, targets: Targets) -> tuple[Assignment, dict[str, Tensor]]:
        obj, box, anchors = output.flat_cls()[..., 0], output.flat_box(), output.flat_anchors()
        with torch.no_grad():
            asg = assign_batch(anchors, targets, self.pos_iou, self.neg_iou)
            asg.matched_labels = torch.where(asg.pos_mask, 0, -1)  # the RPN's single "object" class
            picked = [subsample(p, n, self.samples, 0.5) for p, n in zip(asg.pos_mask, asg.neg_mask)]
        pos_b = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(picked)])
        pos_a = torch.cat([p for p, _ in picked])
        neg_b = torch.cat([torch.full_like(n, i) for i, (_, n) in enumerate(picked)])
        neg_a = torch.cat([n for _, n in picked])
        num = max(pos_a.numel() + neg_a.numel(), 1)
        logits = torch.cat([obj[pos_b, pos_a], obj[neg_b, neg_a]])
        labels = torch.cat([torch.ones_like(obj[pos_b, pos_a]), torch.zeros_like(obj[neg_b, neg_a])])
        cls_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / num
        target = self.coder.encode(asg.target_boxes[pos_b, pos_a], anchors[pos_a])
        box_loss = F.smooth_l1_loss(box[pos_b, pos_a], target, beta=1.0 / 9, reduction="sum") / num
        return asg, {"rpn_cls": cls_loss, "rpn_box": box_loss}


class RoIHead(nn.Module):
    """RoIAlign on the level ``floor(4 + log2(sqrt(area) / 224))`` (clamped), two FC layers, class + box outputs.

    Training samples ``samples`` RoIs per image (GT boxes added to the proposals),
    at most a quarter foreground (IoU >= 0.5 with a GT), the rest background.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: tuple[int, ...],
        roi_size: int = 7,
        fc_channels: int = 256,
        samples: int = 128,
        fg_iou: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_classes, self.strides, self.roi_size = num_classes, tuple(strides), roi_size
        self.samples, self.fg_iou = samples, fg_iou
        self.coder = HbbCoder()
        self.register_buffer("delta_scale", torch.tensor(ROI_DELTA_SCALE), persistent=False)
        self.fc1 = nn.Linear(channels * roi_size * roi_size, fc_channels)
        self.fc2 = nn.Linear(fc_channels, fc_channels)
        self.cls_out = nn.Linear(fc_channels, num_classes + 1)
        self.box_out = nn.Linear(fc_channels, num_classes * 4)
        nn.init.normal_(self.cls_out.weight, std=0.01)
        nn.init.normal_(self.box_out.weight, std=0.001)
        nn.init.zeros_(self.cls_out.bias)
        nn.init.zeros_(self.box_out.bias)

    def pool(self, features: list[Tensor], rois: Tensor, batch_index: Tensor) -> Tensor:
        """``(R, C, roi_size, roi_size)``: each RoI from the level its size maps to (canonical 224 px at stride 16)."""
        size = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).clamp(min=1e-6).sqrt()
        log_strides = torch.tensor([math.log2(s) for s in self.strides], device=rois.device)
        wanted = torch.floor(4 + torch.log2(size / 224 + 1e-8))  # log2 of the wanted stride
        level = (wanted[:, None] - log_strides[None]).abs().argmin(dim=1)  # clamps to the available levels
        out = rois.new_zeros((rois.shape[0], features[0].shape[1], self.roi_size, self.roi_size))
        boxes = torch.cat([batch_index[:, None].to(rois.dtype), rois], dim=1)
        for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
            sel = (level == lvl).nonzero(as_tuple=True)[0]
            if sel.numel():
                out[sel] = roi_align(feat, boxes[sel], self.roi_size, 1.0 / stride, sampling_ratio=2, aligned=True)
        return out

    def forward(self, features: list[Tensor], rois: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(cls_logits (R, K+1), box_deltas (R, K*4), batch_index (R,))`` for the per-image RoIs."""
        batch_index = torch.cat(
            [torch.full((r.shape[0],), i, device=r.device, dtype=torch.long) for i, r in enumerate(rois)]
        )
        x = self.pool(features, torch.cat(rois), batch_index).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.cls_out(x), self.box_out(x), batch_index

    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: Targets) -> tuple[list[Tensor], Tensor, Tensor]:
        """Sampled RoIs per image, their labels ``(R,)`` (``K`` = background) and scaled box targets ``(R, 4)``."""
        rois, labels, box_targets = [], [], []
        for props, gt, gt_labels in zip(proposals, targets.boxes, targets.labels):
            gt, gt_labels = gt.to(props), gt_labels.to(props.device)
            props = torch.cat([props, gt])
            if gt.shape[0]:
                best_iou, best_gt = box_iou(gt, props).max(dim=0)
            else:
                best_iou = props.new_zeros(props.shape[0])
                best_gt = torch.zeros(props.shape[0], dtype=torch.long, device=props.device)
            fg = best_iou >= self.fg_iou
            fg_idx, bg_idx = subsample(fg, ~fg, self.samples, 0.25)
            idx = torch.cat([fg_idx, bg_idx])
            rois.append(props[idx])
            lab = torch.full((idx.numel(),), self.num_classes, dtype=torch.long, device=props.device)
            lab[: fg_idx.numel()] = gt_labels[best_gt[fg_idx]]
            labels.append(lab)
            matched = gt[best_gt[idx]] if gt.shape[0] else props[idx]
            box_targets.append(self.coder.encode(matched, props[idx]) * self.delta_scale)
        return rois, torch.cat(labels), torch.cat(box_targets)

    def loss(self, cls_logits: Tensor, box_deltas: Tensor, labels: Tensor, box_targets: Tensor) -> dict[str, Tensor]:
        fg = (labels < self.num_classes).nonzero(as_tuple=True)[0]
        deltas = box_deltas.view(-1, self.num_classes, 4)[fg, labels[fg]]
        num = max(labels.numel(), 1)
        return {
            "roi_cls": F.cross_entropy(cls_logits, labels),
            "roi_box": F.smooth_l1_loss(deltas, box_targets[fg], beta=1.0 / 9, reduction="sum") / num,
        }

    def detections(
        self,
        output: TwoStageOutput,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        max_per_image: int = 100,
        pre_nms_top_k: int = 1000,
    ) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" (M, 4), "scores", "labels"}``: class-specific boxes, class-wise NMS, best first."""
        k = self.num_classes
        probs = output.roi_cls_logits.softmax(dim=1)[:, :k]  # (R, K), background dropped
        deltas = output.roi_box_deltas.view(-1, k, 4) / self.delta_scale
        rois = torch.cat(output.rois) if output.rois else deltas.new_zeros((0, 4))
        boxes = clip_boxes(self.coder.decode(deltas, rois[:, None, :]), output.image_size)  # (R, K, 4)
        labels = torch.arange(k, device=probs.device).expand_as(probs)
        results = []
        for i in range(len(output.rois)):
            sel = output.roi_batch_index == i
            b, s, lab = boxes[sel].reshape(-1, 4), probs[sel].reshape(-1), labels[sel].reshape(-1)
            keep = (s > score_threshold).nonzero(as_tuple=True)[0]
            if keep.numel() > pre_nms_top_k:
                keep = keep[s[keep].topk(pre_nms_top_k).indices]
            keep = keep[remove_small_boxes(b[keep], 1e-2)]
            keep = keep[batched_nms(b[keep], s[keep], lab[keep], nms_iou)][:max_per_image]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return results


class FasterRCNN(Detector):
    """backbone -> FPN -> RPN (``self.head``) -> proposals -> RoI head; forward returns :class:`TwoStageOutput`."""

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        rpn: RPNHead,
        roi_head: RoIHead,
        proposals_train: int = 512,
        proposals_test: int = 300,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone, neck, rpn, spec=spec)
        self.roi_head = roi_head
        self.num_classes = roi_head.num_classes
        self.proposals_train, self.proposals_test = proposals_train, proposals_test

    def forward(self, images: Tensor, targets: Targets | None = None) -> TwoStageOutput:
        targets = own_targets(targets, self.info.box_dim)
        features = self.neck(self.backbone(images))
        cls_logits, box_regs, _ = self.head(features)
        out = TwoStageOutput(
            info=self.info,
            features=features,
            cls_logits=cls_logits,
            box_regs=box_regs,
            anchors=self.head.anchors(features, self.info.strides),
            image_size=(images.shape[-2], images.shape[-1]),
            head_fn=self.head_fn,
            roi_head_fn=self.roi_head_fn,
            inputs=images,
            num_object_classes=self.num_classes,
        )
        keep = self.proposals_train if self.training else self.proposals_test
        proposals = self.head.proposals(out, pre_nms_top_k=2 * keep, post_nms_top_k=keep)
        roi_features = features[: len(self.roi_head.strides)]
        if targets is None:
            out.rois = proposals
            out.roi_cls_logits, out.roi_box_deltas, out.roi_batch_index = self.roi_head(roi_features, proposals)
            return out
        out.assignment, rpn_losses = self.head.loss(out, targets)
        out.rois, out.roi_labels, box_targets = self.roi_head.sample(proposals, targets)
        out.roi_cls_logits, out.roi_box_deltas, out.roi_batch_index = self.roi_head(roi_features, out.rois)
        roi_losses = self.roi_head.loss(out.roi_cls_logits, out.roi_box_deltas, out.roi_labels, box_targets)
        out.losses = {**rpn_losses, **roi_losses}
        return out

    def roi_head_fn(self, features: list[Tensor], rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The second stage on any FPN features (all levels given, as ``forward`` has them) at given
        per-image RoIs: ``(cls_logits (R, K+1), box_deltas (R, K*4))``."""
        cls_logits, box_deltas, _ = self.roi_head(features[: len(self.roi_head.strides)], rois)
        return cls_logits, box_deltas

    @torch.no_grad()
    def predict(self, images: Tensor, **decode_kwargs: Any) -> list[dict[str, Tensor]]:
        """Forward in eval mode, decode via the RoI head (:meth:`RoIHead.detections` takes the kwargs)."""
        was_training = self.training
        self.eval()
        try:
            return self.roi_head.detections(self(images), **decode_kwargs)
        finally:
            self.train(was_training)


def build_faster_rcnn(
    backbone: nn.Module, neck: nn.Module, head: dict[str, Any], num_classes: int, spec: dict[str, Any]
) -> FasterRCNN:
    """A :class:`FasterRCNN` from a validated ``kind: faster_rcnn`` spec's parts (see :mod:`rkd.models.factory`)."""
    rpn = RPNHead(
        neck.channels,
        convs=head["convs"],
        anchor_ratios=tuple(head["anchor_ratios"]),
        anchor_scales=tuple(head["anchor_scales"]),
        anchor_size=head["anchor_size"],
        samples=head["rpn_samples"],
    )
    # RoIs are pooled from the levels the backbone feeds (not the extra stride-64/128 ones).
    roi_head = RoIHead(
        neck.channels,
        num_classes,
        tuple(backbone.out_strides),
        head["roi_size"],
        head["fc_channels"],
        head["roi_samples"],
    )
    return FasterRCNN(backbone, neck, rpn, roi_head, head["proposals_train"], head["proposals_test"], spec=spec)
