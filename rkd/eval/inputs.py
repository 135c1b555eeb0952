"""Turn per-image detection / ground-truth dicts into flat arrays, checking them on the way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rkd.errors import DataError
from rkd.geometry.boxes import obb_to_hbb, obb_to_poly
from rkd.geometry.polygon_iou import signed_area


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
    return boxes


def _as_polygons(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Every image's boxes as (M, 8) polygons: oriented boxes become their 4 corners (the same region)."""
    return [b if b.shape[1] == 8 else obb_to_poly(torch.from_numpy(b.astype(np.float64))).numpy() for b in boxes]


class FlatBoxes:
    """All boxes of one side (detections or ground truths) concatenated over images.

    Attributes: ``boxes`` (N, 5 or 4) float64, or (N, 8) polygons when an image gave
    polygons (every oriented box then becomes its 4 corners, see :meth:`to_polygons`),
    ``labels``, ``images``, ``groups`` (image * num_classes + label), ``hbb`` (N, 4)
    enclosing xyxy, ``area``; detections add ``scores``; ground truths add ``ignore``
    (difficult or crowd) and ``crowd``.
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
        if any(len(b) and b.shape[1] == 8 for b in boxes):
            boxes, width = _as_polygons(boxes), 8
        boxes = [b if len(b) else np.zeros((0, width)) for b in boxes]
        self.boxes = np.concatenate(boxes).astype(np.float64, copy=False) if boxes else np.zeros((0, width))
        raw_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.images = np.repeat(np.arange(len(counts)), counts)
        # whole-array tests first (contiguous, fast); the per-row masks that name the entry only on failure
        if not np.isfinite(self.boxes).all():
            self._check(np.isfinite(self.boxes).all(1), "boxes", "contains NaN or infinite values")
        if raw_labels.dtype.kind not in "iub":
            self._check(
                raw_labels == np.round(raw_labels.astype(np.float64)), "labels", "class labels must be integers"
            )
        self.labels = raw_labels.astype(np.int64)
        self._check((self.labels >= 0) & (self.labels < num_classes), "labels", f"labels must be in [0, {num_classes})")
        self.groups = self.images * num_classes + self.labels
        if self.polygons:
            self._polygon_geometry()
        elif oriented:
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
            if not np.isfinite(self.scores).all():
                self._check(np.isfinite(self.scores), "scores", "contains NaN or infinite values")

    @property
    def polygons(self) -> bool:
        """Whether ``boxes`` are (N, 8) polygons (the IoU is then the polygons' IoU)."""
        return self.boxes.shape[1] == 8

    def to_polygons(self) -> None:
        """Turn oriented boxes into their corner polygons, to be compared with the other side's polygons."""
        if not self.polygons:
            self.boxes = _as_polygons([self.boxes])[0].reshape(-1, 8)
            self._polygon_geometry()

    def _polygon_geometry(self) -> None:
        b = self.boxes
        # column by column: numpy reduces long 1-D columns far faster than rows of 4
        x, y = [b[:, k] for k in range(0, 8, 2)], [b[:, k] for k in range(1, 8, 2)]
        self.hbb = np.stack([np.minimum.reduce(x), np.minimum.reduce(y), np.maximum.reduce(x), np.maximum.reduce(y)], 1)
        self.area = np.abs(signed_area(torch.from_numpy(b)).numpy())  # what DOTA's devkit divides by

    def _check(self, ok: np.ndarray, key: str, message: str) -> None:
        """Raise for the first row that is not ``ok``, naming its image and position."""
        if ok.all():
            return
        row = int(np.argmin(ok))
        image = int(self.images[row])
        raise DataError(f"{self._name}[{image}][{key!r}]: {message} (entry {row - int(self._starts[image])})")
