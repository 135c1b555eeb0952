"""Detection-to-ground-truth matching, vectorised over images, classes and settings.

A *group* is one (image, class). Two rules:

* :func:`greedy_match` (pycocotools' rule): within a group, detections are taken in
  descending score order; each one matches the unmatched ground truth with the
  highest IoU >= the threshold, preferring ground truths that count over ignored
  ones (difficult / crowd / outside the area range). A detection whose only
  candidates are ignored ground truths is itself ignored; ignored "repeatable"
  ground truths (difficult, crowd) can absorb any number of detections. Matching
  is sequential only inside a group, so step k processes the k-th detection of
  every group at once: the Python loop runs over ranks, not over detections.
* :func:`voc_match` (the rule of the VOC devkit's ``voc_eval`` and of DOTA's
  devkit ``dota_evaluation_task1.py``): each detection looks only at the ground
  truth of its group with the highest IoU (taken or not, difficult or not; the
  first in file order on ties). If that IoU is > the threshold (strictly), the
  detection is ignored when that ground truth is difficult, a true positive when
  it is the first detection (by score) to reach it, else a false positive.
  Nothing here is sequential: the best ground truth does not depend on the others.

IoU is on xyxy boxes (N, 4), oriented boxes (N, 5) or quadrilaterals as given (N, 8).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from rkd.geometry.polygon_iou import is_convex, polygon_iou_pairs, signed_area
from rkd.geometry.rotated_iou import rotated_iou_aligned

_MAX_PAIRS_PER_CHUNK = 1 << 21


def _may_reach(
    a_hbb: np.ndarray, b_hbb: np.ndarray, a_area: np.ndarray, b_area: np.ndarray, iof: np.ndarray, min_iou: float
) -> np.ndarray:
    """Cheap upper bound test: can the pair's IoU (IoF where ``iof``) reach ``min_iou``?

    The boxes' intersection is at most the intersection of their enclosing
    axis-aligned boxes and at most the smaller area; IoU grows with it.
    Exact for axis-aligned boxes, and it drops most pairs before the exact IoU.
    """
    iw = np.minimum(a_hbb[:, 2], b_hbb[:, 2]) - np.maximum(a_hbb[:, 0], b_hbb[:, 0])
    ih = np.minimum(a_hbb[:, 3], b_hbb[:, 3]) - np.maximum(a_hbb[:, 1], b_hbb[:, 1])
    inter = np.minimum(np.clip(iw, 0, None) * np.clip(ih, 0, None), np.minimum(a_area, b_area))
    denom = np.where(iof, a_area, a_area + b_area - inter)
    # slack so rounding in the bound never drops a pair that reaches the threshold exactly
    return (inter > 0) & (inter >= (min_iou - 1e-9) * denom)


def _frame_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Area of ``a`` ∩ (``b``'s enclosing box aligned with ``a``'s axes): a bound on the oriented intersection."""
    da = b[:, 4] - a[:, 4]
    cos, sin = np.abs(np.cos(da)), np.abs(np.sin(da))
    half_x = (b[:, 2] * cos + b[:, 3] * sin) / 2
    half_y = (b[:, 2] * sin + b[:, 3] * cos) / 2
    dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    ca, sa = np.cos(a[:, 4]), np.sin(a[:, 4])
    x, y = dx * ca + dy * sa, dy * ca - dx * sa  # b's centre in a's frame
    ox = np.minimum(a[:, 2] / 2, x + half_x) - np.maximum(-a[:, 2] / 2, x - half_x)
    oy = np.minimum(a[:, 3] / 2, y + half_y) - np.maximum(-a[:, 3] / 2, y - half_y)
    return np.clip(ox, 0, None) * np.clip(oy, 0, None)


def _obb_may_reach(a: np.ndarray, b: np.ndarray, iof: np.ndarray, min_iou: float) -> np.ndarray:
    """Tighter bound for oriented pairs: the intersection is inside both frame-aligned overlaps."""
    area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
    inter = np.minimum(_frame_overlap(a, b), _frame_overlap(b, a))
    inter = np.minimum(inter, np.minimum(area_a, area_b))
    denom = np.where(iof, area_a, area_a + area_b - inter)
    return (inter > 0) & (inter >= (min_iou - 1e-9) * denom)


def _same_group_pairs(det_group: np.ndarray, gt_group: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All (detection, ground truth) index pairs of the same group, in chunks of bounded size."""
    gt_order = np.argsort(gt_group, kind="stable")
    sorted_groups = gt_group[gt_order]
    start = np.searchsorted(sorted_groups, det_group, "left")
    count = np.searchsorted(sorted_groups, det_group, "right") - start
    first_pair = np.cumsum(count) - count
    chunk_of_det = first_pair // _MAX_PAIRS_PER_CHUNK
    edges = np.r_[0, np.flatnonzero(np.diff(chunk_of_det)) + 1, len(det_group)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        counts = count[lo:hi]
        total = int(counts.sum())
        if total == 0:
            continue
        det = np.repeat(np.arange(lo, hi), counts)
        offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        yield det, gt_order[np.repeat(start[lo:hi], counts) + offset]


def _hbb_iou(a: np.ndarray, b: np.ndarray, iof: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    denom = np.where(iof, area_a, area_a + area_b - inter)
    return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def _exact_iou(a: np.ndarray, b: np.ndarray, iof: np.ndarray, polygon_info: tuple | None = None) -> np.ndarray:
    """Rotated-box IoU for (N, 5) pairs, polygon IoU for (N, 8) pairs; IoF where ``iof``.

    ``polygon_info``: the pairs' signed areas and "both convex" mask, known per polygon by the caller.
    """
    out = np.empty(len(a))
    for mode, sel in (("iou", ~iof), ("iof", iof)):
        if not sel.any():
            continue
        if polygon_info is None:
            out[sel] = rotated_iou_aligned(torch.from_numpy(a[sel]), torch.from_numpy(b[sel]), mode=mode).numpy()
        else:
            area_a, area_b, convex = (torch.from_numpy(v[sel]) for v in polygon_info)
            out[sel] = polygon_iou_pairs(
                torch.from_numpy(a[sel]), torch.from_numpy(b[sel]), area_a, area_b, convex, mode=mode
            ).numpy()
    return out


def overlapping_pairs(
    det_group: np.ndarray,
    det_boxes: np.ndarray,
    det_hbb: np.ndarray,
    det_area: np.ndarray,
    gt_group: np.ndarray,
    gt_boxes: np.ndarray,
    gt_hbb: np.ndarray,
    gt_area: np.ndarray,
    gt_iof: np.ndarray,
    min_iou: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (det, gt, iou) of the same group with IoU >= ``min_iou``.

    ``*_boxes`` are what the IoU is computed on ((N, 5) oriented, (N, 8) polygons
    or (N, 4) xyxy, then equal to ``*_hbb``), ``*_area`` their areas; ground truths
    with ``gt_iof`` (crowd) use intersection over the detection's area instead.
    """
    width = det_boxes.shape[1]
    if width == 8:  # per polygon, once: signed area and convexity
        det_signed, gt_signed = (signed_area(torch.from_numpy(boxes)).numpy() for boxes in (det_boxes, gt_boxes))
        det_convex, gt_convex = (is_convex(torch.from_numpy(boxes)).numpy() for boxes in (det_boxes, gt_boxes))
        # The area bound assumes the intersection is at most the smaller area, which the devkit's signed
        # intersection of a self-intersecting polygon need not be: pairs with a non-convex one only need to touch.
        any_odd = not (det_convex.all() and gt_convex.all())
    # x extents as contiguous columns: a first test on them is cheap (1-D gathers) and drops most
    # same-group pairs (objects elsewhere in the image) before the 4-column bound is gathered
    det_x0, det_x1 = np.ascontiguousarray(det_hbb[:, 0]), np.ascontiguousarray(det_hbb[:, 2])
    gt_x0, gt_x1 = np.ascontiguousarray(gt_hbb[:, 0]), np.ascontiguousarray(gt_hbb[:, 2])
    dets, gts, ious = [], [], []
    for d, g in _same_group_pairs(det_group, gt_group):
        near = (det_x0[d] <= gt_x1[g]) & (gt_x0[g] <= det_x1[d])
        d, g = d[near], g[near]
        keep = _may_reach(det_hbb[d], gt_hbb[g], det_area[d], gt_area[g], gt_iof[g], min_iou)
        if width == 8 and any_odd:
            odd = ~(det_convex[d] & gt_convex[g])
            keep |= odd & _may_reach(det_hbb[d], gt_hbb[g], det_area[d], gt_area[g], gt_iof[g], 0.0)
        d, g = d[keep], g[keep]
        if width == 5:
            keep = _obb_may_reach(det_boxes[d], gt_boxes[g], gt_iof[g], min_iou)
            d, g = d[keep], g[keep]
        if width == 4:
            iou = _hbb_iou(det_boxes[d], gt_boxes[g], gt_iof[g])
        else:
            info = (det_signed[d], gt_signed[g], det_convex[d] & gt_convex[g]) if width == 8 else None
            iou = _exact_iou(det_boxes[d], gt_boxes[g], gt_iof[g], info)
        keep = iou >= min_iou
        dets.append(d[keep]), gts.append(g[keep]), ious.append(iou[keep])
    if not dets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(dets), np.concatenate(gts), np.concatenate(ious)


def greedy_match(
    pair_det: np.ndarray,
    pair_gt: np.ndarray,
    pair_iou: np.ndarray,
    det_rank: np.ndarray,
    num_dets: int,
    thresholds: np.ndarray,
    gt_ignored: np.ndarray,
    gt_repeatable: np.ndarray,
) -> np.ndarray:
    """Matched ground truth (S, num_dets) of every detection per setting, -1 when unmatched.

    Setting s uses IoU threshold ``thresholds[s]`` and ignore flags ``gt_ignored[s]`` (S, G).
    ``det_rank`` is each detection's position in its group by descending score.
    """
    num_settings = len(thresholds)
    matched = np.full((num_settings, num_dets), -1, dtype=np.int64)
    if len(pair_det) == 0:
        return matched
    taken = np.zeros(gt_ignored.shape, dtype=bool)
    # Order pairs by rank, then detection; lexsort is stable, keeping each detection's ground truths in order.
    order = np.lexsort((pair_det, det_rank[pair_det]))
    pair_det, pair_gt, pair_iou = pair_det[order], pair_gt[order], pair_iou[order]
    rank = det_rank[pair_det]
    steps = np.r_[0, np.flatnonzero(np.diff(rank)) + 1, len(rank)]
    thr = thresholds[:, None]
    for lo, hi in zip(steps[:-1], steps[1:]):
        d, g, iou = pair_det[lo:hi], pair_gt[lo:hi], pair_iou[lo:hi]
        n = hi - lo
        seg_start = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        seg_of_pair = np.cumsum(np.r_[True, d[1:] != d[:-1]]) - 1
        ignored = gt_ignored[:, g]
        candidate = (iou >= thr) & (~taken[:, g] | gt_repeatable[g])
        # Ground truths that count outrank ignored ones; then higher IoU wins; ties go to the later one.
        key = np.where(candidate, iou + np.where(ignored, 0.0, 2.0), -1.0)
        best = np.maximum.reduceat(key, seg_start, axis=1)
        is_best = (key == best[:, seg_of_pair]) & candidate
        chosen = np.maximum.reduceat(np.where(is_best, np.arange(n), -1), seg_start, axis=1)
        s, k = np.nonzero(chosen >= 0)
        p = chosen[s, k]
        taken[s, g[p]] = True
        matched[s, d[p]] = g[p]
    return matched


def voc_match(
    pair_det: np.ndarray,
    pair_gt: np.ndarray,
    pair_iou: np.ndarray,
    det_rank: np.ndarray,
    num_dets: int,
    thresholds: np.ndarray,
    gt_ignored: np.ndarray,
) -> np.ndarray:
    """Matched ground truth (S, num_dets) per setting by the VOC / DOTA devkit rule (module doc), -1 when unmatched.

    A detection that reaches an ignored (difficult) ground truth gets that ground truth, so the
    caller ignores it; one whose best ground truth was already taken gets -1 (a false positive).
    The pairs must hold every pair of a group whose IoU can exceed the lowest threshold.
    """
    matched = np.full((len(thresholds), num_dets), -1, dtype=np.int64)
    if len(pair_det) == 0:
        return matched
    # Best ground truth of each detection: highest IoU, then the lowest index (np.argmax in the devkit).
    order = np.lexsort((pair_gt, -pair_iou, pair_det))
    first = np.r_[True, pair_det[order][1:] != pair_det[order][:-1]]
    best = order[first]
    d, g, iou = pair_det[best], pair_gt[best], pair_iou[best]
    by_gt = np.lexsort((det_rank[d], g))  # each ground truth's claimants in score order
    d, g, iou = d[by_gt], g[by_gt], iou[by_gt]
    for s, threshold in enumerate(thresholds):  # a handful of settings; all work inside is vectorised
        hit = iou > threshold
        ignored = gt_ignored[s, g]
        claims = hit & ~ignored
        gc = g[claims]
        winner = np.flatnonzero(claims)[np.r_[True, gc[1:] != gc[:-1]]] if claims.any() else np.zeros(0, np.int64)
        matched[s, d[hit & ignored]] = g[hit & ignored]
        matched[s, d[winner]] = g[winner]
    return matched
