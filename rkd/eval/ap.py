"""Average precision from ranked true/false positives, for several settings at once.

All functions take ``tp`` and ``fp`` as (S, D) boolean arrays: S settings
(IoU thresholds x area ranges), D detections of one class in descending
score order; an ignored detection is simply
neither (it leaves precision and recall unchanged). ``num_pos`` (S,) is the
number of ground truths that count for each setting.
"""

from __future__ import annotations

import numpy as np

INTERPOLATIONS = ("all", "11point", "coco101")


def precision_recall(
    tp: np.ndarray, fp: np.ndarray, num_pos: np.ndarray, coco: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative precision and recall (S, D) down the ranking (``coco``: pycocotools' epsilon)."""
    tp_cum = np.cumsum(tp, axis=1, dtype=np.float64)
    fp_cum = np.cumsum(fp, axis=1, dtype=np.float64)
    recall = tp_cum / np.maximum(num_pos, 1)[:, None]
    if coco:
        precision = tp_cum / (tp_cum + fp_cum + np.spacing(1))
    else:
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return precision, recall


def _envelope(precision: np.ndarray) -> np.ndarray:
    """Monotone precision envelope: the best precision at this rank or any later one."""
    return np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]


def _sampled(envelope: np.ndarray, recall: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Envelope precision at the first rank whose recall reaches each point (0 past the last rank)."""
    out = np.zeros((recall.shape[0], len(points)))
    for s in range(recall.shape[0]):  # S is small (<= 40); the work per row is vectorised
        idx = np.searchsorted(recall[s], points, side="left")
        ok = idx < recall.shape[1]
        out[s, ok] = envelope[s, idx[ok]]
    return out


def average_precision(tp: np.ndarray, fp: np.ndarray, num_pos: np.ndarray, interpolation: str = "all") -> np.ndarray:
    """AP (S,) of each setting.

    ``all``: area under the precision envelope (VOC 2010+ / DOTA);
    ``11point``: mean envelope precision at recall 0, 0.1, .., 1 (VOC 2007);
    ``coco101``: mean at 101 recall points 0, 0.01, .., 1, as pycocotools does.

    Two ground truths, ranking TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.

    >>> tp, fp = np.array([[True, False, True]]), np.array([[False, True, False]])
    >>> float(average_precision(tp, fp, np.array([2]), "all")[0])  # 0.5 * 1 + 0.5 * 2/3
    0.8333333333333333
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation == "coco101":
        # pycocotools' exact formula, epsilon included, so results agree to the last digit.
        precision, recall = precision_recall(tp, fp, num_pos, coco=True)
        points = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
        return _sampled(_envelope(precision), recall, points).mean(axis=1)
    precision, recall = precision_recall(tp, fp, num_pos)
    if interpolation == "11point":
        return _sampled(_envelope(precision), recall, np.linspace(0.0, 1.0, 11)).mean(axis=1)
    s = recall.shape[0]
    recall = np.concatenate([np.zeros((s, 1)), recall, np.ones((s, 1))], axis=1)
    precision = np.concatenate([np.zeros((s, 1)), precision, np.zeros((s, 1))], axis=1)
    return (np.diff(recall, axis=1) * _envelope(precision)[:, 1:]).sum(axis=1)
