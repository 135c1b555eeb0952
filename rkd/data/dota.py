"""DOTA v1.0 / v1.5 / v2.0 ``labelTxt``: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` in pixels.

Read as DOTA's devkit reads them (Xia et al., "DOTA: A Large-scale Dataset for
Object Detection in Aerial Images", CVPR 2018, DOI 10.1109/CVPR.2018.00418):

* header lines ``imagesource:...`` and ``gsd:...`` are skipped wherever they appear;
* ``difficult`` is an integer and any non-zero value is difficult (the devkit's
  splitter writes 2 for objects cut by a patch border); the value is kept in
  :attr:`PolygonRecord.difficulty`; missing (9 fields, as in some test-set labels) it is 0;
* a zero-area polygon (the splitter writes them at patch borders) is dropped with a
  warning in the report, never failing the read;
* files are UTF-8 (a byte-order mark is dropped); another encoding is a problem at ``file:line``.

Records keep the polygons as written (evaluation takes their IoU as DOTA does) beside
their minimum-area le90 boxes (training targets). Three layouts are accepted::

    root/<split>/images/<id>.png   root/<split>/labelTxt/<id>.txt   (as DOTA ships)
    root/images/<split>/<id>.png   root/labelTxt/<split>/<id>.txt
    root/images/<id>.png           root/labelTxt/<id>.txt           (no split: the devkit's examples)

The last is one unsplit set, read with ``split=None`` or :data:`FLAT_SPLIT` (``"all"``).

Class names are the given list or the name of a known list (:data:`DOTA_CLASSES`,
e.g. ``"dota-v1.0"``; a name not in the list is a problem), else the lines of
``root/classes.txt`` when there is one (``rkd data tile`` writes it, keeping the
source's class order), else every name found in the split's labels, sorted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rkd.data.images import find_images
from rkd.data.parsing import PolygonRecord, header_size, parse_coords, parse_int, polygon_record, read_text_lines
from rkd.data.sample import OnError, ReadReport
from rkd.errors import DataError

HEADER_PREFIXES = ("imagesource:", "gsd:")
FLAT_SPLIT = "all"  # the split name of the unsplit layout (as for VOC-style folders without split lists)

_DOTA_V1 = (
    "plane",
    "baseball-diamond",
    "bridge",
    "ground-track-field",
    "small-vehicle",
    "large-vehicle",
    "ship",
    "tennis-court",
    "basketball-court",
    "storage-tank",
    "soccer-ball-field",
    "roundabout",
    "harbor",
    "swimming-pool",
    "helicopter",
)
# The class lists of the DOTA releases, in the devkit's order (the order models trained on DOTA use).
DOTA_CLASSES: dict[str, tuple[str, ...]] = {
    "dota-v1.0": _DOTA_V1,
    "dota-v1.5": (*_DOTA_V1, "container-crane"),
    "dota-v2.0": (*_DOTA_V1, "container-crane", "airport", "helipad"),
}


def named_classes(classes: list[str] | str | None) -> list[str] | None:
    """``classes`` with a known list's name (``"dota-v1.0"``) replaced by its class names.

    >>> len(named_classes("dota-v1.5")), named_classes(["car"])
    (16, ['car'])
    """
    if not isinstance(classes, str):
        return None if classes is None else list(classes)
    if classes not in DOTA_CLASSES:
        raise DataError(f"unknown class list {classes!r}; known lists: {', '.join(DOTA_CLASSES)} (or give the names)")
    return list(DOTA_CLASSES[classes])


def _flat_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(root/images, root/labelTxt)`` when they hold files directly (not split folders)."""
    image_dir, label_dir = root / "images", root / "labelTxt"
    if image_dir.is_dir() and label_dir.is_dir() and not any(p.is_dir() for p in label_dir.iterdir()):
        return image_dir, label_dir
    return None


def is_flat(root: Path) -> bool:
    """Whether ``root`` is one unsplit DOTA set (``images/`` + ``labelTxt/`` holding the files)."""
    return _flat_dirs(Path(root)) is not None


def dota_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    """``(image_dir, label_dir)`` of a split in whichever layout exists (``None``: the unsplit layout)."""
    root = Path(root)
    flat = _flat_dirs(root)
    candidates = []
    if split is not None:
        candidates = [
            (root / split / "images", root / split / "labelTxt"),
            (root / "images" / split, root / "labelTxt" / split),
        ]
    for image_dir, label_dir in candidates:
        if image_dir.is_dir() and label_dir.is_dir():
            return image_dir, label_dir
    if flat is not None and split in (None, FLAT_SPLIT):
        return flat
    if flat is not None:
        raise DataError(
            f"{root}: no DOTA split {split!r}: this folder is one unsplit set ({flat[0]} + {flat[1]}); "
            f"leave the split out (or name it {FLAT_SPLIT!r})"
        )
    if split is None:
        raise DataError(f"{root}: not an unsplit DOTA folder (images/ + labelTxt/ holding the files); name a split")
    tried = "; ".join(f"{i} + {lab}" for i, lab in candidates)
    raise DataError(f"{root}: no DOTA split {split!r} (looked for image and labelTxt folders: {tried})")


CLASS_LIST_FILE = "classes.txt"


def read_dota(
    root: Path, split: str | None, class_names: list[str] | str | None = None, on_error: OnError = "raise"
) -> tuple[list[PolygonRecord], list[str], ReadReport]:
    """Records of one split (``None``: the unsplit layout), the class names and a report (see module doc)."""
    root = Path(root)
    report = ReadReport(on_error=on_error)
    class_names = named_classes(class_names)
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
        polys, found, difficulty, wheres = parsed[image_id]
        known = [name in index for name in found]
        for ok, name, where in zip(known, found, wheres):
            if not ok:
                report.problem(where, f"class {name!r} is not one of the {len(names)} class names {names}")
        polys = [p for p, ok in zip(polys, known) if ok]
        wheres = [w for w, ok in zip(wheres, known) if ok]
        labels = torch.tensor([index[n] for n, ok in zip(found, known) if ok], dtype=torch.long)
        level = torch.tensor([d for d, ok in zip(difficulty, known) if ok], dtype=torch.long)
        size = header_size(image_path, report)
        if size is None:
            continue
        record = polygon_record(image_id, size, polys, labels, level, wheres, report, image_path)
        records.append(record)
        report.images += 1
        report.objects += len(record.labels)
    return records, names, report


def _parse_label_file(path: Path, report: ReadReport):
    """``(polygons, class names, difficulty values, wheres)`` of the valid lines of one file."""
    polys, names, difficulty, wheres = [], [], [], []
    for lineno, line in read_text_lines(path, report):
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
        level = parse_int(fields[9], "difficult flag", where, report) if len(fields) == 10 else 0
        if level is None:
            continue
        polys.append(coords)
        names.append(fields[8])
        difficulty.append(level)
        wheres.append(where)
    return polys, names, difficulty, wheres
