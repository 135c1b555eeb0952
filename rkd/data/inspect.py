"""What is in a dataset (:func:`dataset_stats`) and what is wrong with it (:func:`check_dataset`).

Both work on any detection format in ``READERS`` and on ``scenes`` folders
(classification: image counts per class, no boxes). :func:`available_splits`
finds the splits a dataset folder holds, so ``rkd data check PATH`` can check
all of them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rkd.data.sample import DetectionRecord
from rkd.errors import DataError

SCENES = "scenes"
# Box size is sqrt(w * h) in pixels of the file; the edges follow the usual small-object scale steps.
SIZE_EDGES = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, math.inf)
# Aspect ratio is long side / short side (>= 1).
ASPECT_EDGES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0, math.inf)


@dataclass
class DatasetStats:
    """Counts of one split. ``objects``, ``difficult`` and ``images_with`` are per class, in class order."""

    class_names: list[str]
    images: int
    images_without_objects: int
    objects: list[int]
    difficult: list[int]
    images_with: list[int]
    size_counts: list[int]  # per SIZE_EDGES bin
    aspect_counts: list[int]  # per ASPECT_EDGES bin
    median_size: list[float] = field(default_factory=list)  # per class, nan without objects

    @property
    def total_objects(self) -> int:
        return sum(self.objects)


def histogram(values: np.ndarray, edges: tuple[float, ...]) -> list[int]:
    """Counts of ``values`` in the half-open bins ``[edges[i], edges[i+1])`` (the last bin is open).

    >>> histogram(np.array([0.5, 1.0, 7.9, 8.0, 900.0]), (0.0, 1.0, 8.0, math.inf))
    [1, 2, 2]
    """
    index = np.searchsorted(np.asarray(edges[1:-1]), values, side="right")
    return np.bincount(index, minlength=len(edges) - 1).tolist()


def dataset_stats(records: list[DetectionRecord], class_names: list[str]) -> DatasetStats:
    """Images, objects per class, and box size / aspect-ratio histograms of ``records``.

    >>> r = DetectionRecord("a", (100, 100), torch.tensor([[50.0, 50.0, 40.0, 10.0, 0.0]]),
    ...                     torch.tensor([1]), torch.tensor([False]))
    >>> s = dataset_stats([r], ["plane", "car"])
    >>> s.objects, s.size_counts[2], s.aspect_counts[4]  # sqrt(400) = 20 in [16, 32); 40/10 = 4 in [4, 6)
    ([0, 1], 1, 1)
    """
    k = len(class_names)
    if records:
        boxes = torch.cat([r.boxes.reshape(-1, 5) for r in records]).double().numpy()
        labels = torch.cat([r.labels.reshape(-1) for r in records]).numpy()
        difficult = torch.cat([r.difficult.reshape(-1) for r in records]).numpy()
        owner = np.repeat(np.arange(len(records)), [len(r.labels) for r in records])
    else:
        boxes, labels, difficult, owner = np.zeros((0, 5)), np.zeros(0, int), np.zeros(0, bool), np.zeros(0, int)
    w, h = boxes[:, 2], boxes[:, 3]
    sizes = np.sqrt(w * h)
    aspects = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1e-12)
    present = np.zeros((len(records), k), dtype=bool)
    present[owner, labels] = True
    medians = [float(np.median(sizes[labels == c])) if np.any(labels == c) else math.nan for c in range(k)]
    return DatasetStats(
        class_names=list(class_names),
        images=len(records),
        images_without_objects=sum(1 for r in records if len(r.labels) == 0),
        objects=np.bincount(labels, minlength=k).tolist(),
        difficult=np.bincount(labels[difficult], minlength=k).tolist(),
        images_with=present.sum(axis=0).tolist(),
        size_counts=histogram(sizes, SIZE_EDGES),
        aspect_counts=histogram(aspects, ASPECT_EDGES),
        median_size=medians,
    )


def scene_stats(items: list[tuple[Path, int]], class_names: list[str]) -> DatasetStats:
    """Image counts per class of a scene-classification split (no boxes: the histograms are empty)."""
    labels = np.array([label for _, label in items], dtype=int)
    per_class = np.bincount(labels, minlength=len(class_names)).tolist()
    return DatasetStats(
        class_names=list(class_names),
        images=len(items),
        images_without_objects=0,
        objects=[0] * len(class_names),
        difficult=[0] * len(class_names),
        images_with=per_class,
        size_counts=[0] * (len(SIZE_EDGES) - 1),
        aspect_counts=[0] * (len(ASPECT_EDGES) - 1),
        median_size=[math.nan] * len(class_names),
    )


def _edge(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def format_stats(stats: DatasetStats, title: str, scenes: bool = False) -> str:
    """A text table of one split's statistics."""
    if scenes:
        lines = [f"{title}: {stats.images} images, {len(stats.class_names)} classes"]
        width = max([5, *(len(n) for n in stats.class_names)])
        lines.append(f"  {'class':<{width}}  {'images':>7}")
        lines += [f"  {n:<{width}}  {c:>7}" for n, c in zip(stats.class_names, stats.images_with)]
        return "\n".join(lines)
    lines = [
        f"{title}: {stats.images} images ({stats.images_without_objects} without objects), "
        f"{stats.total_objects} objects ({sum(stats.difficult)} difficult), {len(stats.class_names)} classes"
    ]
    width = max([5, *(len(n) for n in stats.class_names)])
    lines.append(f"  {'class':<{width}}  {'objects':>7}  {'difficult':>9}  {'images':>6}  {'median size':>11}")
    for i, name in enumerate(stats.class_names):
        median = "-" if math.isnan(stats.median_size[i]) else f"{stats.median_size[i]:.1f}"
        counts = f"{stats.objects[i]:>7}  {stats.difficult[i]:>9}  {stats.images_with[i]:>6}"
        lines.append(f"  {name:<{width}}  {counts}  {median:>11}")
    lines.append("  box size sqrt(w*h), pixels:")
    for lo, hi, count in zip(SIZE_EDGES, SIZE_EDGES[1:], stats.size_counts):
        lines.append(f"    [{_edge(lo)}, {_edge(hi)})".ljust(18) + f"{count:>7}")
    lines.append("  aspect ratio, long/short side:")
    for lo, hi, count in zip(ASPECT_EDGES, ASPECT_EDGES[1:], stats.aspect_counts):
        lines.append(f"    [{_edge(lo)}, {_edge(hi)})".ljust(18) + f"{count:>7}")
    return "\n".join(lines)


def stats_png(stats_by_split: dict[str, DatasetStats], title: str) -> bytes:
    """A PNG: objects (or images) per class, box sizes and aspect ratios, one bar series per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    n = len(stats_by_split)
    width = 0.8 / max(n, 1)
    panels = [
        ("objects per class", lambda s: s.objects if s.total_objects else s.images_with, None),
        ("box size sqrt(w*h), px", lambda s: s.size_counts, SIZE_EDGES),
        ("aspect ratio (long/short)", lambda s: s.aspect_counts, ASPECT_EDGES),
    ]
    for ax, (label, values_of, edges) in zip(axes, panels):
        ticks: list[str] = []
        for j, (split, stats) in enumerate(stats_by_split.items()):
            values = values_of(stats)
            x = np.arange(len(values)) + (j - (n - 1) / 2) * width
            ax.bar(x, values, width=width, label=split)
            if edges is None:
                ticks = stats.class_names
            else:
                ticks = [f"{_edge(lo)}-{_edge(hi)}" for lo, hi in zip(edges, edges[1:])]
        ax.set_xticks(np.arange(len(ticks)), ticks, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def available_splits(root: Path, fmt: str) -> list[str]:
    """The splits a dataset folder of format ``fmt`` holds, sorted (XML formats without lists: ``["all"]``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    found: set[str] = set()
    if fmt == "ucas":
        found = {p.name for p in (root / "labels").glob("*") if p.is_dir() and (root / "images" / p.name).is_dir()}
    elif fmt == "dota":
        from rkd.data.dota import FLAT_SPLIT, is_flat

        found = {p.parent.name for p in root.glob("*/labelTxt") if (p.parent / "images").is_dir()}
        found |= {p.name for p in (root / "labelTxt").glob("*") if p.is_dir() and (root / "images" / p.name).is_dir()}
        found |= {FLAT_SPLIT} if is_flat(root) else set()
    elif fmt == "coco":
        for pattern in ("annotations/instances_*.json", "annotations/*.json", "*.json"):
            for p in root.glob(pattern):
                found.add(p.stem.removeprefix("instances_") if p.parent.name == "annotations" else p.stem)
    elif fmt in ("voc", "dior", "hrsc"):
        from rkd.data.hrsc import HRSC_LAYOUT
        from rkd.data.voc import ALL_SPLIT, DIOR_LAYOUT, VOC_LAYOUT

        layout = {"voc": VOC_LAYOUT, "dior": DIOR_LAYOUT, "hrsc": HRSC_LAYOUT}[fmt]
        for folder in layout.list_dirs:
            found |= {p.stem for p in (root / folder).glob("*.txt")}
        # VOC keeps per-class lists <class>_<split>.txt beside the split lists: not splits.
        found = {s for s in found if s.rpartition("_")[2] not in found or "_" not in s}
        found = found or {ALL_SPLIT}
    elif fmt == SCENES:
        found = {p.name for p in root.iterdir() if p.is_dir()}
    else:
        from rkd.data.formats import READERS

        raise DataError(f"unknown format {fmt!r}; expected one of {[*READERS, SCENES]}")
    if not found:
        raise DataError(f"{root}: no {fmt} split found here")
    return sorted(found)


def default_split(root: Path, fmt: str) -> str:
    """The split to use when none is named: the only one, else ``"val"``.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> _ = [(d / f).mkdir() for f in ("images", "labelTxt")]
    >>> default_split(d, "dota")  # one unsplit set (the DOTA devkit's example layout)
    'all'
    """
    splits = available_splits(root, fmt)
    if len(splits) == 1:
        return splits[0]
    if "val" in splits:
        return "val"
    raise DataError(f"{root}: holds splits {splits} but no 'val'; name the split to use")


def read_split(root: Path, fmt: str, split: str, classes: list[str] | None = None, on_error: str = "raise"):
    """``(records or scene items, class names, report)`` of one split of any format."""
    from rkd.data.formats import READERS

    if fmt == SCENES:
        from rkd.data.scenes import read_scenes

        return read_scenes(Path(root), split, classes, on_error=on_error)
    if fmt not in READERS:
        raise DataError(f"unknown format {fmt!r}; expected one of {[*READERS, SCENES]}")
    return READERS[fmt](Path(root), split, classes, on_error=on_error)


def check_dataset(root: Path, fmt: str, splits: list[str] | None = None, classes: list[str] | None = None) -> list[str]:
    """Every problem of the given splits (default: all of them), as ``"where: why"`` lines.

    Label problems come from the reader (``file:line: ...``); then every image is
    decoded, so a truncated or unreadable file, or one whose size disagrees with
    its labels, is listed too. An empty list means the dataset is clean.
    """
    from rkd.data.images import decoded_size
    from rkd.data.parsing import outside_boxes

    problems: list[str] = []
    for split in splits if splits is not None else available_splits(root, fmt):
        try:
            items, _, report = read_split(root, fmt, split, classes, on_error="skip")
        except DataError as e:  # a problem the reader cannot skip past (no folder, unreadable list)
            problems.append(str(e))
            continue
        problems += report.skipped
        if fmt == SCENES:
            paths = [path for path, _ in items]
            checks = [(path, None) for path in paths]
        else:
            for record in items:
                if record.image_path is None and record.render is None:
                    problems.append(f"{root}: image {record.image_id}: no image file (no image folder: labels only)")
                for i in outside_boxes(record.boxes, record.image_size):
                    cx, cy = (round(float(v), 1) for v in record.boxes[i, :2])
                    problems.append(
                        f"{record.image_path or record.image_id}: box {i} (centre {cx}, {cy}) lies "
                        f"entirely outside the {record.image_size[1]}x{record.image_size[0]} image"
                    )
            checks = [(r.image_path, r.image_size) for r in items if r.image_path is not None]
        for path, expected in checks:
            try:
                decoded = decoded_size(path)
            except DataError as e:
                problems.append(str(e))
                continue
            if expected is not None and decoded != tuple(expected):
                problems.append(f"{path}: decoded size {decoded} differs from the header's {expected}")
    return list(dict.fromkeys(problems))  # overlapping splits (VOC trainval/train) report a problem once
