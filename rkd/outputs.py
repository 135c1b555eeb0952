"""The contract between detectors and distillation methods.

Every detector in rkd (and every adapted third-party detector) returns a
:class:`DetectorOutput`; every KD component reads only this type and a
:class:`Targets`. Nothing here depends on a model implementation, so
``rkd.distill`` stays usable with any detector framework.

Layout conventions (shared by all producers and consumers):

* Levels are ordered finest first (stride 8, 16, 32, ...).
* Per-level head maps are laid out as the head conv emits them,
  ``(B, A * D, H, W)`` with anchor-major channels: channel ``a * D + d``
  is value ``d`` of anchor ``a`` at that location.
* Flattened per-anchor tensors ``(B, N, D)`` enumerate levels in order,
  then locations row-major, then anchors: index ``((y * W + x) * A + a)``
  offset by the number of anchors of the earlier levels.
  :func:`flatten_levels` converts maps to this order.
* Oriented boxes are ``(cx, cy, w, h, angle)`` in input-image pixels, le90:
  ``w >= h`` and ``angle`` in ``[-pi/2, pi/2)``, measured from the +x axis
  towards +y (clockwise on screen, since image y points down).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class DetectorInfo:
    """Static facts about a detector that KD components need to build their parts.

    Args:
        level_channels: channels of the FPN feature map of each level.
        strides: stride of each level, finest first.
        num_classes: number of object classes (no background class).
        num_anchors: anchors per location (1 for anchor-free heads).
        box_dim: 5 for oriented boxes (with angle), 4 for horizontal ones.
        has_centerness: whether the head predicts centerness.
        angle_bins: bins of the angle classification branch (0 if none).
    """

    level_channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_classes: int
    num_anchors: int
    box_dim: int
    has_centerness: bool = False
    angle_bins: int = 0

    @property
    def oriented(self) -> bool:
        return self.box_dim == 5


@dataclass
class Assignment:
    """Training-time label assignment, flattened over levels (see module doc).

    ``pos_mask | neg_mask | ignore_mask`` is all-true and the three are disjoint.
    ``matched_gt`` indexes the image's GT boxes (-1 where unmatched);
    ``matched_labels`` is the class of that GT (-1 where unmatched);
    ``target_boxes`` holds the matched GT box (zeros where unmatched).
    """

    pos_mask: Tensor  # (B, N) bool
    neg_mask: Tensor  # (B, N) bool
    ignore_mask: Tensor  # (B, N) bool
    matched_gt: Tensor  # (B, N) long
    matched_labels: Tensor  # (B, N) long
    target_boxes: Tensor  # (B, N, box_dim)


@dataclass
class Targets:
    """Ground truth of a batch, one entry per image, boxes in input pixels."""

    boxes: list[Tensor]  # each (Ni, 5) le90 or (Ni, 4) xyxy
    labels: list[Tensor]  # each (Ni,) long
    image_size: tuple[int, int]  # (H, W) of the network input

    def to(self, device: torch.device | str) -> Targets:
        return Targets(
            [b.to(device) for b in self.boxes],
            [lab.to(device) for lab in self.labels],
            self.image_size,
        )


@dataclass
class DetectorOutput:
    """What a detector's forward returns; all a KD method may read.

    ``anchors`` are per level ``(H*W*A, box_dim)`` in input pixels (for
    anchor-free heads, ``A == 1`` and the boxes are zero-size at the points).
    ``assignment`` and ``losses`` are present only when targets were given.
    """

    info: DetectorInfo
    features: list[Tensor]  # per level (B, C_l, H_l, W_l)
    cls_logits: list[Tensor]  # per level (B, A*K, H, W)
    box_regs: list[Tensor]  # per level (B, A*box_dim, H, W), encoded deltas
    anchors: list[Tensor]  # per level (H*W*A, box_dim)
    image_size: tuple[int, int]
    centerness: list[Tensor] | None = None  # per level (B, A, H, W)
    angle_logits: list[Tensor] | None = None  # per level (B, A*bins, H, W)
    assignment: Assignment | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    # The head as a function of FPN features -> (cls_logits, box_regs), per level as above.
    # Methods that run a (frozen) head on other features use it (DS2D2's amplifiers).
    head_fn: Callable[[list[Tensor]], tuple[list[Tensor], list[Tensor]]] | None = None
    # The normalised input batch (B, 3, H, W), for methods with an external prior (IFKD's EDE).
    inputs: Tensor | None = None
    # Two-stage detectors only (empty / None otherwise): the second stage's RoIs, per image
    # (R_i, 4) xyxy in input pixels; its logits (R, K + 1), background last; its class-specific
    # deltas (R, K * 4), class k in columns 4k..4k+3; the image of each RoI (R,); and the RoI head
    # as a function of FPN features and per-image RoIs -> (logits, deltas), for methods that run
    # a (frozen) second stage on other features (DS2D2's Faster R-CNN amplifier).
    rois: list[Tensor] = field(default_factory=list)
    roi_cls_logits: Tensor | None = None
    roi_box_deltas: Tensor | None = None
    roi_batch_index: Tensor | None = None
    roi_head_fn: Callable[[list[Tensor], list[Tensor]], tuple[Tensor, Tensor]] | None = None

    def flat_cls(self) -> Tensor:
        """Class logits as ``(B, N, K)``."""
        return flatten_levels(self.cls_logits, self.info.num_anchors)

    def flat_box(self) -> Tensor:
        """Box regressions as ``(B, N, box_dim)``."""
        return flatten_levels(self.box_regs, self.info.num_anchors)

    def flat_anchors(self) -> Tensor:
        """Anchors of all levels as ``(N, box_dim)``."""
        return torch.cat(self.anchors, dim=0)

    def level_sizes(self) -> list[int]:
        """Number of flattened entries (locations x anchors) per level."""
        return [f.shape[-2] * f.shape[-1] * self.info.num_anchors for f in self.cls_logits]


def flatten_levels(maps: list[Tensor], num_anchors: int) -> Tensor:
    """``[(B, A*D, H, W), ...] -> (B, sum(H*W*A), D)`` in the documented order.

    >>> import torch
    >>> m = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(1, 6, 1, 2)
    >>> flatten_levels([m], num_anchors=2)[0, :, 0].tolist()  # loc 0: a0, a1; loc 1: a0, a1
    [0.0, 6.0, 1.0, 7.0]
    """
    flat = []
    for m in maps:
        b, ad, h, w = m.shape
        d = ad // num_anchors
        flat.append(m.view(b, num_anchors, d, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, d))
    return torch.cat(flat, dim=1)


def unflatten_levels(flat: Tensor, like: list[Tensor], num_anchors: int) -> list[Tensor]:
    """Inverse of :func:`flatten_levels` for maps shaped like ``like``."""
    out, start = [], 0
    for m in like:
        b, _, h, w = m.shape
        n = h * w * num_anchors
        d = flat.shape[-1]
        chunk = flat[:, start : start + n].reshape(b, h, w, num_anchors, d)
        out.append(chunk.permute(0, 3, 4, 1, 2).reshape(b, num_anchors * d, h, w))
        start += n
    return out


@dataclass(frozen=True)
class ClassifierInfo:
    """Static facts about a scene classifier that classification KD components build from.

    Args:
        level_channels: channels of each backbone feature map, finest first.
        strides: stride of each of those maps relative to the input, finest first.
        num_classes: number of scene classes.
        resize_to: the side the classifier resizes its input to before the backbone (``None``: none);
            ``strides`` are then relative to that resized input.

    >>> ClassifierInfo(level_channels=(8, 16), strides=(8, 16), num_classes=3).num_levels
    2
    """

    level_channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_classes: int
    resize_to: int | None = None

    @property
    def num_levels(self) -> int:
        return len(self.level_channels)


@dataclass
class ClassifierOutput:
    """What a scene classifier's forward returns; all a classification KD method may read.

    ``losses`` holds ``{"cls": cross-entropy}`` only when labels were given.
    """

    features: list[Tensor]  # backbone outputs, finest first, (B, C_l, H_l, W_l)
    pooled: Tensor  # (B, C_last): global average of the last feature map
    logits: Tensor  # (B, num_classes)
    losses: dict[str, Tensor] = field(default_factory=dict)
