"""Spatial masks built from ground truth, shared by KD components.

Shared helpers (other KD files in this package may import them):

* :func:`box_frame_coords` - each point's coordinates in each oriented box's frame.
* :func:`points_in_boxes` - vectorised point-in-rotated-box test.
* :func:`cells_touching_boxes` - vectorised test: does a location's cell overlap a rotated box.
* :func:`location_centres` - the input-pixel centre of every location of each level.
* :func:`padded_gt` - a batch's GT boxes as one padded ``(B, M, 5)`` tensor plus validity.
* :func:`box_cells` - per level ``(B, H*W, M)``: which cells each GT box touches.
* :func:`foreground_masks` - per level ``(B, 1, H, W)`` GT foreground masks.
* :func:`centerness_instance_masks` - CID's per-instance normalised centerness masks.

Boxes are ``(cx, cy, w, h, angle)`` (le90, angle from +x towards +y); ``(N, 4)`` boxes are
taken as ``xyxy`` and converted with angle 0. Nothing here loops over boxes in Python.

A location's *cell* is the ``stride x stride`` square centred on it; a box marks as foreground
every cell it overlaps with positive area, not only the cells whose centre it contains, so an
object smaller than a cell (7 px between the centres of stride-8 cells) is never lost. This is
the released FGD code's rule (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022, arXiv:2111.11837: floor/ceil of the box edges over the stride; that code
also takes the cell past an edge lying exactly on a cell border, which covers zero area of it;
here it stays background), made exact for oriented boxes by the separating-axis test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rkd.outputs import DetectorOutput, Targets


def as_rotated(boxes: Tensor) -> Tensor:
    """``(..., 5)`` boxes unchanged; ``(..., 4)`` xyxy boxes as ``(cx, cy, w, h, 0)``.

    >>> as_rotated(torch.tensor([[0.0, 0.0, 4.0, 2.0]])).tolist()
    [[2.0, 1.0, 4.0, 2.0, 0.0]]
    """
    if boxes.shape[-1] == 5:
        return boxes
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 (xyxy) or 5 (cx, cy, w, h, angle) values, got {boxes.shape[-1]}")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)], dim=-1)


def box_frame_coords(points: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates ``(u, v)`` of points in the frame of each box, origin at the box centre.

    ``points``: ``(..., P, 2)``; ``boxes``: ``(..., M, 5)`` with the same leading dims.
    Returns ``u, v`` of shape ``(..., P, M)``: ``u`` along the box's w-axis ``(cos a, sin a)``,
    ``v`` along its h-axis ``(-sin a, cos a)``.

    >>> u, v = box_frame_coords(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0, 1.5707963]]))
    >>> round(u.item(), 4), round(v.item(), 4)
    (0.0, -1.0)
    """
    dx = points[..., :, None, 0] - boxes[..., None, :, 0]
    dy = points[..., :, None, 1] - boxes[..., None, :, 1]
    cos, sin = torch.cos(boxes[..., None, :, 4]), torch.sin(boxes[..., None, :, 4])
    return dx * cos + dy * sin, -dx * sin + dy * cos


def points_in_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """``(..., P, M)`` bool: point ``p`` lies inside (or on the border of) oriented box ``m``.

    >>> pts = torch.tensor([[0.0, 1.5], [1.5, 0.0]])
    >>> points_in_boxes(pts, torch.tensor([[0.0, 0.0, 4.0, 2.0, 1.5707963]])).flatten().tolist()
    [True, False]
    """
    boxes = as_rotated(boxes)
    u, v = box_frame_coords(points, boxes)
    w, h = boxes[..., None, :, 2], boxes[..., None, :, 3]
    return (u.abs() <= w / 2) & (v.abs() <= h / 2)


# Overlaps thinner than this share of a cell count as edge contact: angles such as pi/2 are not
# exact in floating point, and a box edge on a cell border must not leak into the next cell.
TOUCH_TOLERANCE = 1e-4


def cell_overlap(points: Tensor, boxes: Tensor, stride: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box-frame coordinates of cell centres, the cells' reach along the box axes, and the overlap test.

    ``points``: ``(..., P, 2)`` cell centres, ``boxes``: ``(..., M, 5)``. Returns ``u, v`` as
    :func:`box_frame_coords`, ``reach`` ``(..., 1, M)`` = the half extent of a ``stride x stride``
    cell projected on the box's axes, ``s/2 (|cos a| + |sin a|)``, and ``touch`` ``(..., P, M)``
    bool. By the separating-axis theorem two rectangles overlap iff their projections overlap on
    each of their four edge normals: on the box's axes ``|u| < w/2 + reach`` and ``|v| < h/2 + reach``;
    on the image axes ``|dx|`` and ``|dy|`` below the box's axis-aligned half extent plus ``s/2``.
    """
    u, v = box_frame_coords(points, boxes)
    w, h = boxes[..., None, :, 2], boxes[..., None, :, 3]
    cos, sin = torch.cos(boxes[..., None, :, 4]).abs(), torch.sin(boxes[..., None, :, 4]).abs()
    half, tol = stride / 2, TOUCH_TOLERANCE * stride
    reach = half * (cos + sin)
    dx = (points[..., :, None, 0] - boxes[..., None, :, 0]).abs()
    dy = (points[..., :, None, 1] - boxes[..., None, :, 1]).abs()
    touch = (
        (u.abs() < w / 2 + reach - tol)
        & (v.abs() < h / 2 + reach - tol)
        & (dx < (w * cos + h * sin) / 2 + half - tol)
        & (dy < (w * sin + h * cos) / 2 + half - tol)
        & (w > 0)
        & (h > 0)  # a degenerate box covers no area
    )
    return u, v, reach, touch


def cells_touching_boxes(points: Tensor, stride: float, boxes: Tensor) -> Tensor:
    """``(..., P, M)`` bool: the ``stride x stride`` cell centred at ``p`` overlaps box ``m`` (area > 0).

    >>> pts = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]])
    >>> cells_touching_boxes(pts, 8, torch.tensor([[7.0, 3.0, 11.0, 5.0]])).flatten().tolist()
    [True, True, False]
    """
    return cell_overlap(points, as_rotated(boxes), stride)[3]


def grid_centres(height: int, width: int, stride: float, offset: float = 0.5, device=None) -> Tensor:
    """``(H*W, 2)`` centres ``((x + offset) * stride, (y + offset) * stride)``, row-major.

    >>> grid_centres(1, 2, 8).tolist()
    [[4.0, 4.0], [12.0, 4.0]]
    """
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([(xs.flatten() + offset) * stride, (ys.flatten() + offset) * stride], dim=-1)


def location_centres(out: DetectorOutput) -> list[Tensor]:
    """Per level ``(H*W, 2)`` input-pixel centres of the feature locations.

    Taken from the detector's anchors (the first anchor of each location) when they are
    given, so masks agree with the detector's own assignment; otherwise a grid with
    offset 0.5 at the level's stride.
    """
    centres = []
    num_anchors = out.info.num_anchors
    for lvl, feat in enumerate(out.features):
        h, w = feat.shape[-2:]
        anchors = out.anchors[lvl] if out.anchors and lvl < len(out.anchors) else None
        if anchors is not None and anchors.shape[0] == h * w * num_anchors:
            centres.append(as_rotated(anchors[::num_anchors].to(feat.device, torch.float32))[:, :2])
        else:
            centres.append(grid_centres(h, w, out.info.strides[lvl], device=feat.device))
    return centres


def padded_gt(targets: Targets, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """GT of a batch as ``boxes (B, M, 5)``, ``labels (B, M)`` (-1 for padding) and ``valid (B, M)``.

    ``M`` is the largest number of boxes in an image (at least 1, so shapes stay non-empty).
    Padding boxes have zero size and are never "inside".

    >>> boxes = [torch.tensor([[0.0, 0.0, 4.0, 2.0]]), torch.zeros(0, 4)]
    >>> t = Targets(boxes, [torch.tensor([3]), torch.zeros(0)], (8, 8))
    >>> b, lab, valid = padded_gt(t)
    >>> b.shape, lab.tolist(), valid.tolist()
    (torch.Size([2, 1, 5]), [[3], [-1]], [[True], [False]])
    """
    device = device if device is not None else (targets.boxes[0].device if targets.boxes else "cpu")
    bsz = len(targets.boxes)
    m = max([1] + [int(b.shape[0]) for b in targets.boxes])
    boxes = torch.zeros(bsz, m, 5, device=device)
    labels = torch.full((bsz, m), -1, dtype=torch.long, device=device)
    valid = torch.zeros(bsz, m, dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(targets.boxes, targets.labels)):  # per image, not per box
        n = int(b.shape[0])
        if n:
            boxes[i, :n] = as_rotated(b.to(device, torch.float32).reshape(n, -1))
            labels[i, :n] = lab.to(device).long()
            valid[i, :n] = True
    return boxes, labels, valid


def box_cells(targets: Targets, out: DetectorOutput) -> tuple[list[Tensor], Tensor, Tensor]:
    """Per level ``(B, H*W, M)`` bool: the location's cell overlaps GT box ``m``; plus padded boxes and validity.

    Cells are centred on :func:`location_centres` of ``out``, one level stride wide.
    """
    centres = location_centres(out)
    boxes, _, valid = padded_gt(targets, centres[0].device)
    touched = []
    for c, f, stride in zip(centres, out.features, out.info.strides):
        pts = c.to(boxes.dtype).expand(boxes.shape[0], f.shape[-2] * f.shape[-1], 2)
        touched.append(cell_overlap(pts, boxes, stride)[3] & valid[:, None, :])
    return touched, boxes, valid


def foreground_masks(targets: Targets, out: DetectorOutput) -> list[Tensor]:
    """Per level ``(B, 1, H, W)`` float masks: 1 where the location's cell overlaps any GT box."""
    touched, _, _ = box_cells(targets, out)
    return [t.any(dim=-1).to(f.dtype).view(f.shape[0], 1, *f.shape[-2:]) for t, f in zip(touched, out.features)]


def centerness(u: Tensor, v: Tensor, w: Tensor, h: Tensor, exponent: float = 1.0) -> Tensor:
    """FCOS centerness raised to ``exponent``: ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) ** exponent``.

    ``l, r = w/2 + u, w/2 - u`` and ``t, b = h/2 + v, h/2 - v`` from box-frame coordinates;
    points outside get 0. ``exponent`` 1 is FCOS's centerness; larger values favour the centre.

    >>> centerness(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(4.0), torch.tensor(2.0)).item()
    1.0
    >>> round(centerness(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(4.0), torch.tensor(2.0)).item(), 4)
    0.5774
    """
    lft, rgt = (w / 2 + u).clamp(min=0), (w / 2 - u).clamp(min=0)
    top, bot = (h / 2 + v).clamp(min=0), (h / 2 - v).clamp(min=0)
    eps = torch.finfo(u.dtype).tiny
    ratio = (torch.minimum(lft, rgt) / torch.maximum(lft, rgt).clamp(min=eps)) * (
        torch.minimum(top, bot) / torch.maximum(top, bot).clamp(min=eps)
    )
    return ratio.clamp(min=0) ** (exponent / 2)


def centerness_instance_masks(targets: Targets, out: DetectorOutput, exponent: float = 1.0) -> list[Tensor]:
    """CID instance mask per level ``(B, 1, H, W)``, normalised so each instance contributes equally.

    Every cell a GT box overlaps gets the FCOS centerness of its centre within the box grown by
    the cell's reach on each side (``w + 2 reach``, ``h + 2 reach``, see :func:`cell_overlap`):
    positive on exactly the cells the box touches, so an object smaller than a cell still has
    weight at every level, largest at the cell nearest its centre. Each box's weights are divided
    by their total over all levels, so they sum to 1; overlapping instances add. The mask of an
    image therefore sums to its number of instances that touch at least one cell (every box of
    positive size inside the image).
    """
    centres = location_centres(out)
    boxes, _, valid = padded_gt(targets, centres[0].device)
    per_level = []
    for c, f, stride in zip(centres, out.features, out.info.strides):
        pts = c.to(boxes.dtype).expand(boxes.shape[0], f.shape[-2] * f.shape[-1], 2)
        u, v, reach, touch = cell_overlap(pts, boxes, stride)
        bw, bh = boxes[:, None, :, 2] + 2 * reach, boxes[:, None, :, 3] + 2 * reach
        per_level.append(centerness(u, v, bw, bh, exponent) * (touch & valid[:, None, :]))  # (B, HW, M)
    totals = sum(c.sum(dim=1) for c in per_level)  # (B, M)
    norm = torch.where(totals > 0, 1.0 / totals.clamp(min=torch.finfo(totals.dtype).tiny), torch.zeros_like(totals))
    return [
        (c * norm[:, None, :]).sum(-1).view(f.shape[0], 1, *f.shape[-2:]).to(f.dtype)
        for c, f in zip(per_level, out.features)
    ]
