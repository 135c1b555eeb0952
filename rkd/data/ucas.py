"""UCAS-AOD / YOLO-polygon labels: ``cls x1 y1 x2 y2 x3 y3 x4 y4`` normalised to [0, 1].

Layout::

    root/images/<split>/<id>.png|jpg|...
    root/labels/<split>/<id>.txt

Corner ``x`` values are divided by the image width and ``y`` by its height, so
the image size (read from the header, pixels are not decoded) turns them back
into pixels. An image without a label file has no objects (YOLO convention);
a label file without an image is a problem.

Records keep the corners (in pixels, in the file's order) beside their minimum-area
le90 boxes, as DOTA's and DIOR-R's do (:func:`rkd.data.parsing.polygon_record`), so that
``rkd evaluate`` takes the IoU of the labelled quadrilaterals. There is no difficult flag:
``difficulty`` is 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rkd.data.images import find_images, require_dir
from rkd.data.parsing import PolygonRecord, header_size, parse_coords, parse_int, polygon_record
from rkd.data.sample import OnError, ReadReport

UCAS_CLASSES = ["plane", "car"]

# Corners of objects cut by the image border sit slightly outside [0, 1] in
# real labels (ucas50 reaches 1.0006); beyond this margin a value is wrong.
NORMALISED_MARGIN = 0.05


def read_ucas(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[PolygonRecord], list[str], ReadReport]:
    """Records of one split, the class names (``["plane", "car"]`` unless given) and a report."""
    root = Path(root)
    names = list(class_names) if class_names is not None else list(UCAS_CLASSES)
    report = ReadReport(on_error=on_error)
    image_dir = require_dir(root / "images" / split, f"UCAS/YOLO images of split {split!r}")
    label_dir = require_dir(root / "labels" / split, f"UCAS/YOLO labels of split {split!r}")
    images = find_images(image_dir)
    for label_path in sorted(label_dir.glob("*.txt")):
        if label_path.stem not in images:
            report.problem(str(label_path), f"no image {label_path.stem}.* in {image_dir}")

    records = []
    for image_id, image_path in images.items():
        size = header_size(image_path, report)
        if size is None:
            continue
        polys, classes, wheres = _read_label_file(label_dir / f"{image_id}.txt", size, names, report)
        labels = torch.tensor(classes, dtype=torch.long)
        record = polygon_record(image_id, size, polys, labels, torch.zeros_like(labels), wheres, report, image_path)
        records.append(record)
        report.images += 1
        report.objects += len(record.labels)
    return records, names, report


def _read_label_file(path: Path, size: tuple[int, int], names: list[str], report: ReadReport):
    """``(polygons in pixels, class indices, wheres)`` of the valid lines of one file (no file: no objects)."""
    height, width = size
    polys, classes, wheres = [], [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 9:
            report.problem(where, f"expected 9 fields (class x1 y1 x2 y2 x3 y3 x4 y4), got {len(fields)}")
            continue
        cls = parse_int(fields[0], "class", where, report)
        if cls is None:
            continue
        if not 0 <= cls < len(names):
            report.problem(where, f"class {cls} out of range for {len(names)} classes {names}")
            continue
        coords = parse_coords(fields[1:], where, report)
        if coords is None:
            continue
        outside = [c for c in coords if not -NORMALISED_MARGIN <= c <= 1 + NORMALISED_MARGIN]
        if outside:
            report.problem(where, f"coordinate {outside[0]} is outside [0, 1] (labels must be normalised)")
            continue
        polys.append([c * (width if i % 2 == 0 else height) for i, c in enumerate(coords)])
        classes.append(cls)
        wheres.append(where)
    return polys, classes, wheres
