"""Turn per-image detection / ground-truth dicts into flat arrays, checking them on the way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rkd.errors import DataError
from rkd.geometry.boxes import obb_to_hbb, poly_to_obb


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _get(entry: Mapping[str, Any], key: str, where: str, n: int | None) -> np.ndarray:
    if key not in entry:
        raise DataError(f"{where}: missing key {key!r}")
    value = _array(entry[key])
    if n is not None and value.shape != (n,):
        raise DataError(f"{where}[{key!r}]: expected shape ({n},) like its boxes, got {value.shape}")
    return value


def _boxes(entry: Mapping[str, Any], where: str, oriented: bool) -> np.ndarray:
    boxes = _get(entry, "boxes", where, None)
    width = 5 if oriented else 4
    if boxes.size == 0:
        return np.zeros((0, width))
    if boxes.ndim != 2 or boxes.shape[1] not in ((5, 8) if oriented else (4,)):
        kind = "(M, 5) oriented boxes or (M, 8) polygons" if oriented else "(M, 4) xyxy boxes (oriented=False)"
        raise DataError(f"{where}['boxes']: expected {kind}, got shape {boxes.shape}")
    if boxes.shape[1] == 8:
        return poly_to_obb(boxes.astype(np.float64)).numpy()
    return boxes


class FlatBoxes:
    """All boxes of one side (detections or ground truths) concatenated over images.

    Attributes: ``boxes`` (N, 5 or 4) float64, ``labels``, ``images``, ``groups``
    (image * num_classes + label), ``hbb`` (N, 4) enclosing xyxy, ``area``;
    detections add ``scores``; ground truths add ``ignore`` (difficult or crowd)
    and ``crowd``.
    """

    def __init__(
        self, entries: Sequence[Mapping[str, Any]], name: str, num_classes: int, oriented: bool, is_gt: bool
    ) -> None:
        boxes, labels, extra = [], [], []
        flags: list[np.ndarray] = []
        for i, entry in enumerate(entries):  # per image: only gathering and shape checks
            where = f"{name}[{i}]"
            b = _boxes(entry, where, oriented)
            n = len(b)
            boxes.append(b)
            labels.append(_get(entry, "labels", where, n).reshape(n))
            if is_gt:
                difficult = _get(entry, "difficult", where, n) if "difficult" in entry else np.zeros(n, bool)
                crowd = _get(entry, "iscrowd", where, n) if "iscrowd" in entry else np.zeros(n, bool)
                extra.append(crowd.astype(bool))
                flags.append(difficult.astype(bool) | crowd.astype(bool))
            else:
                extra.append(_get(entry, "scores", where, n))
        counts = np.array([len(b) for b in boxes], dtype=np.int64)
        self._name, self._starts = name, np.cumsum(counts) - counts
        width = 5 if oriented else 4
        self.boxes = np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, width))
        raw_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.images = np.repeat(np.arange(len(counts)), counts)
        self._check(np.isfinite(self.boxes).all(1), "boxes", "contains NaN or infinite values")
        self._check(raw_labels == np.round(raw_labels.astype(np.float64)), "labels", "class labels must be integers")
        self.labels = raw_labels.astype(np.int64)
        self._check((self.labels >= 0) & (self.labels < num_classes), "labels", f"labels must be in [0, {num_classes})")
        self.groups = self.images * num_classes + self.labels
        if oriented:
            self.hbb = obb_to_hbb(torch.from_numpy(self.boxes)).numpy()
            self.area = self.boxes[:, 2] * self.boxes[:, 3]
        else:
            self.hbb = self.boxes
            self.area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        if is_gt:
            self.crowd = np.concatenate(extra) if extra else np.zeros(0, bool)
            self.ignore = np.concatenate(flags) if flags else np.zeros(0, bool)
        else:
            self.scores = np.concatenate(extra).astype(np.float64) if extra else np.zeros(0)
            self._check(np.isfinite(self.scores), "scores", "contains NaN or infinite values")

    def _check(self, ok: np.ndarray, key: str, message: str) -> None:
        """Raise for the first row that is not ``ok``, naming its image and position."""
        if ok.all():
            return
        row = int(np.argmin(ok))
        image = int(self.images[row])
        raise DataError(f"{self._name}[{image}][{key!r}]: {message} (entry {row - int(self._starts[image])})")
