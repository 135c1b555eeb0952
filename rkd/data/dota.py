"""DOTA v1.0 / v1.5 / v2.0 ``labelTxt``: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` in pixels.

Optional header lines ``imagesource:...`` and ``gsd:...`` are skipped wherever
they appear; ``difficult`` may be missing (9 fields, as in some test-set
labels) and then counts as 0. Two layouts are accepted, tried in this order::

    root/<split>/images/<id>.png   root/<split>/labelTxt/<id>.txt   (as DOTA ships)
    root/images/<split>/<id>.png   root/labelTxt/<split>/<id>.txt

Class names are the given list (a name not in it is a problem), else the lines of
``root/classes.txt`` when there is one (``rkd data tile`` writes it, keeping the
source's class order), else every name found in the split's labels, sorted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rkd.data.images import find_images, image_size
from rkd.data.parsing import parse_coords, polygons_to_boxes
from rkd.data.sample import DetectionRecord, OnError, ReadReport, empty_targets
from rkd.errors import DataError

HEADER_PREFIXES = ("imagesource:", "gsd:")


def dota_dirs(root: Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, label_dir)`` of a split in whichever layout exists."""
    candidates = [
        (root / split / "images", root / split / "labelTxt"),
        (root / "images" / split, root / "labelTxt" / split),
    ]
    for image_dir, label_dir in candidates:
        if image_dir.is_dir() and label_dir.is_dir():
            return image_dir, label_dir
    tried = "; ".join(f"{i} + {lab}" for i, lab in candidates)
    raise DataError(f"{root}: no DOTA split {split!r} (looked for image and labelTxt folders: {tried})")


CLASS_LIST_FILE = "classes.txt"


def read_dota(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    """Records of one split, the class names and a report (see module doc)."""
    root = Path(root)
    report = ReadReport(on_error=on_error)
    image_dir, label_dir = dota_dirs(root, split)
    images = find_images(image_dir)
    for label_path in sorted(label_dir.glob("*.txt")):
        if label_path.stem not in images:
            report.problem(str(label_path), f"no image {label_path.stem}.* in {image_dir}")

    # Parse everything first: without a given list, class indices need all names.
    parsed = {}
    for image_id in images:
        label_path = label_dir / f"{image_id}.txt"
        parsed[image_id] = _parse_label_file(label_path, report) if label_path.is_file() else ([], [], [], [])
    listed = root / CLASS_LIST_FILE
    if class_names is None and listed.is_file():
        class_names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    if class_names is None:
        names = sorted({name for _, found, _, _ in parsed.values() for name in found})
    else:
        names = list(class_names)
    index = {name: i for i, name in enumerate(names)}

    records = []
    for image_id, image_path in images.items():
        polys, found, difficult, wheres = parsed[image_id]
        known = [name in index for name in found]
        for ok, name, where in zip(known, found, wheres):
            if not ok:
                report.problem(where, f"class {name!r} is not one of the {len(names)} class names {names}")
        polys = [p for p, ok in zip(polys, known) if ok]
        wheres = [w for w, ok in zip(wheres, known) if ok]
        labels = torch.tensor([index[n] for n, ok in zip(found, known) if ok], dtype=torch.long)
        hard = torch.tensor([d for d, ok in zip(difficult, known) if ok], dtype=torch.bool)
        if polys:
            boxes, keep = polygons_to_boxes(polys, wheres, report)
            labels, hard = labels[keep], hard[keep]
        else:
            boxes, labels, hard = empty_targets()
        size = image_size(image_path)
        records.append(DetectionRecord(image_id, size, boxes, labels, hard, image_path=image_path))
        report.images += 1
        report.objects += len(labels)
    return records, names, report


def _parse_label_file(path: Path, report: ReadReport):
    """``(polygons, class names, difficult flags, wheres)`` of the valid lines of one file."""
    polys, names, difficult, wheres = [], [], [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or line.strip().lower().startswith(HEADER_PREFIXES):
            continue
        where = f"{path}:{lineno}"
        if len(fields) not in (9, 10):
            report.problem(where, f"expected 10 fields (x1 y1 .. x4 y4 class difficult), got {len(fields)}")
            continue
        coords = parse_coords(fields[:8], where, report)
        if coords is None:
            continue
        flag = fields[9] if len(fields) == 10 else "0"
        if flag not in ("0", "1"):
            report.problem(where, f"difficult flag {flag!r} must be 0 or 1")
            continue
        polys.append(coords)
        names.append(fields[8])
        difficult.append(flag == "1")
        wheres.append(where)
    return polys, names, difficult, wheres
