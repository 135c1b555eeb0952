"""COCO ``instances`` JSON with horizontal ``bbox`` ``[x, y, w, h]`` boxes.

Layout: the split's annotation file is the first that exists of::

    root/annotations/instances_<split>.json
    root/annotations/<split>.json
    root/<split>.json

and each image's ``file_name`` is relative to the first existing folder of
``root/<split>/``, ``root/images/<split>/``, ``root/images/``, ``root/``.
(There is no "all" rule: a COCO file always names its split.)

Class names are the ``categories`` in id order (or the given list: a category
whose name is not in it is a problem). Images without annotations are kept as
background. Boxes become le90 boxes with :func:`rkd.geometry.hbb_to_obb` (``w >= h``;
a tall box gets angle ``-pi/2``) and the report says ``horizontal``.

**Crowd regions** (``iscrowd: 1``) are kept and flagged *difficult*: they are not
single objects, so evaluation ignores detections on them (neither true nor false
positives) exactly as for VOC ``difficult`` objects, and losses that honour the
difficult flag skip them.

Problems are located by JSON path, ``file.json: annotations[12] (id 907): ...``
(a file that does not parse: ``file.json:LINE``). ``on_error="skip"`` drops the
annotation, or the image for image-level problems (missing file, size that
disagrees with the header).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from rkd.data.images import image_size
from rkd.data.sample import DetectionRecord, OnError, ReadReport, empty_targets
from rkd.errors import DataError


def coco_files(root: Path, split: str) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of a split (see module doc)."""
    candidates = [
        root / "annotations" / f"instances_{split}.json",
        root / "annotations" / f"{split}.json",
        root / f"{split}.json",
    ]
    json_path = next((p for p in candidates if p.is_file()), None)
    if json_path is None:
        raise DataError(f"{root}: no COCO split {split!r} (looked for {', '.join(str(p) for p in candidates)})")
    folders = [root / split, root / "images" / split, root / "images", root]
    return json_path, next(p for p in folders if p.is_dir())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load(json_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}:{e.lineno}: JSON does not parse: {e.msg} (column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: cannot read: {e}") from e
    if not isinstance(doc, dict):
        raise DataError(f"{json_path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{json_path}: '{key}' must be a list, got {type(doc.get(key)).__name__}")
    return doc


def read_coco(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    """Records of one split, the class names and a report (see module doc).

    A file that does not parse, or lacks the three lists, is a :class:`DataError`
    under either policy: nothing of it could be read.
    """
    root = Path(root)
    report = ReadReport(on_error=on_error, horizontal=True)
    json_path, image_dir = coco_files(root, split)
    doc = _load(json_path)

    categories: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        where = f"{json_path}: categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            report.problem(where, "needs an integer 'id' and a string 'name'")
            continue
        if cat["name"] in categories.values() or cat["id"] in categories:
            report.problem(where, f"category id {cat['id']} or name {cat['name']!r} repeats")
            continue
        categories[cat["id"]] = cat["name"]
    names = [categories[k] for k in sorted(categories)] if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}

    images: dict[Any, tuple[str, Path, tuple[int, int]]] = {}  # id -> (where, path, (H, W))
    image_ids: dict[Any, str] = {}
    for i, entry in enumerate(doc["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            report.problem(where, "needs an 'id' and a string 'file_name'")
            continue
        where = f"{where} (id {entry['id']})"
        if entry["id"] in images:
            report.problem(where, f"image id {entry['id']} repeats")
            continue
        path = image_dir / entry["file_name"]
        if not path.is_file():
            report.problem(where, f"image file {path} not found")
            continue
        try:
            size = image_size(path)
        except DataError as e:
            report.problem(where, str(e))
            continue
        stated = (entry.get("height"), entry.get("width"))
        if all(s is not None for s in stated) and tuple(stated) != size:
            report.problem(where, f"height/width {stated[0]}x{stated[1]} but {path.name} is {size[0]}x{size[1]}")
            continue
        images[entry["id"]] = (where, path, size)
        # The file name without suffix, as the other formats name images (predictions are written by it).
        image_ids[entry["id"]] = Path(entry["file_name"]).with_suffix("").as_posix()

    per_image: dict[Any, list[tuple[list[float], int, bool]]] = {k: [] for k in images}
    for i, ann in enumerate(doc["annotations"]):
        where = f"{json_path}: annotations[{i}]"
        if not isinstance(ann, dict):
            report.problem(where, "expected an object")
            continue
        if "id" in ann:
            where = f"{where} (id {ann['id']})"
        if ann.get("image_id") not in images:
            report.problem(where, f"image_id {ann.get('image_id')!r} is not a readable image of this file")
            continue
        bbox = ann.get("bbox")
        values = [_number(v) for v in bbox] if isinstance(bbox, list) else []
        if len(values) != 4 or any(v is None for v in values):
            report.problem(where, f"bbox {bbox!r} must be 4 finite numbers [x, y, w, h]")
            continue
        x, y, w, h = values
        if w <= 0 or h <= 0:
            report.problem(where, f"bbox {bbox!r} is empty (w and h must be > 0)")
            continue
        name = categories.get(ann.get("category_id"))
        if name is None:
            report.problem(where, f"category_id {ann.get('category_id')!r} is not in 'categories'")
            continue
        if name not in index:
            report.problem(where, f"class {name!r} is not one of the {len(names)} class names {names}")
            continue
        crowd = ann.get("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            report.problem(where, f"iscrowd {crowd!r} must be 0 or 1")
            continue
        per_image[ann["image_id"]].append(([x, y, x + w, y + h], index[name], crowd == 1))

    from rkd.geometry import hbb_to_obb

    records = []
    for image_id, (_, path, size) in images.items():
        objects = per_image[image_id]
        if objects:
            xyxy, labels, crowd = zip(*objects)
            boxes = hbb_to_obb(torch.tensor(xyxy, dtype=torch.float64)).float()
            labels_t = torch.tensor(labels, dtype=torch.long)
            difficult = torch.tensor(crowd, dtype=torch.bool)
        else:
            boxes, labels_t, difficult = empty_targets()
        records.append(DetectionRecord(image_ids[image_id], size, boxes, labels_t, difficult, image_path=path))
        report.images += 1
        report.objects += len(labels_t)
    return records, names, report
