"""Prediction files: DOTA "Task1" text files and a JSON list.

Both hold oriented detections per image. In memory they are
``{image_id: {"boxes": (M, 5) le90, "polys": (M, 8), "scores": (M,), "labels": (M,)}}``
(float64 / int64 tensors), the dict shape :func:`rkd.eval.evaluate_detections` takes.

* DOTA Task1: one file per class, ``Task1_<class>.txt``, one detection a line:
  ``<image_id> <score> x1 y1 x2 y2 x3 y3 x4 y4``.
* JSON: ``[{"image_id": ..., "label": int or "class": name, "score": float,
  "poly": [8 numbers] or "obb": [cx, cy, w, h, angle]}, ...]``.

Numbers are written in Python's shortest round-trip form, so writing then
reading gives back the same float64 values. Image ids are strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rkd.errors import DataError
from rkd.geometry.boxes import obb_to_poly, poly_to_obb

Predictions = dict[str, dict[str, torch.Tensor]]

_TASK1_PREFIX = "Task1_"


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _polys_of(det: Mapping[str, Any], image_id: str) -> np.ndarray:
    boxes = _numpy(det["boxes"]).astype(np.float64)
    if boxes.size == 0:
        return np.zeros((0, 8))
    if boxes.ndim == 2 and boxes.shape[1] == 5:
        return obb_to_poly(torch.from_numpy(boxes)).numpy()
    if boxes.ndim == 2 and boxes.shape[1] == 8:
        return boxes
    raise DataError(
        f"predictions[{image_id!r}]['boxes']: expected (M, 5) oriented boxes or (M, 8) polygons, got {boxes.shape}"
    )


def _collect(rows: dict[str, list[tuple[np.ndarray, float, int]]]) -> Predictions:
    out: Predictions = {}
    for image_id, items in rows.items():
        polys = torch.tensor(np.array([p for p, _, _ in items], dtype=np.float64).reshape(-1, 8))
        out[image_id] = {
            "boxes": poly_to_obb(polys),
            "polys": polys,
            "scores": torch.tensor([s for _, s, _ in items], dtype=torch.float64),
            "labels": torch.tensor([c for _, _, c in items], dtype=torch.int64),
        }
    return out


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} {text!r} is not finite")
    return value


def write_dota_task1(
    directory: str | Path, predictions: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]
) -> list[Path]:
    """Write one ``Task1_<class>.txt`` per class (empty if it has no detections); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines: list[list[str]] = [[] for _ in class_names]
    for image_id, det in predictions.items():
        if any(ch.isspace() for ch in str(image_id)):
            raise DataError(f"image id {image_id!r} contains whitespace, which Task1 lines cannot hold")
        polys = _polys_of(det, str(image_id))
        for poly, score, label in zip(polys, _numpy(det["scores"]).tolist(), _numpy(det["labels"]).tolist()):
            if not 0 <= int(label) < len(class_names):
                raise DataError(f"predictions[{image_id!r}]: label {label} has no class name (have {len(class_names)})")
            coords = " ".join(repr(float(v)) for v in poly)
            lines[int(label)].append(f"{image_id} {float(score)!r} {coords}\n")
    paths = []
    for name, class_lines in zip(class_names, lines):
        path = directory / f"{_TASK1_PREFIX}{name}.txt"
        path.write_text("".join(class_lines))
        paths.append(path)
    return paths


def read_dota_task1(source: str | Path | Sequence[str | Path], class_names: Sequence[str]) -> Predictions:
    """Read Task1 files (a directory of ``Task1_*.txt`` or a list of files); labels index ``class_names``."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(Path(source).glob(f"{_TASK1_PREFIX}*.txt"))
    elif isinstance(source, (str, Path)):
        files = [Path(source)]
    else:
        files = [Path(f) for f in source]
    index = {name: i for i, name in enumerate(class_names)}
    rows: dict[str, list[tuple[np.ndarray, float, int]]] = {}
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: prediction file not found")
        name = path.stem[len(_TASK1_PREFIX) :] if path.stem.startswith(_TASK1_PREFIX) else None
        if name not in index:
            raise DataError(f"{path}: file name must be {_TASK1_PREFIX}<class>.txt with a class in {list(class_names)}")
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{line_no}"
            if len(fields) != 10:
                expected = "'image_id score x1 y1 x2 y2 x3 y3 x4 y4' (10 fields)"
                raise DataError(f"{where}: expected {expected}, got {len(fields)}")
            score = _number(fields[1], "score", where)
            poly = np.array([_number(v, "coordinate", where) for v in fields[2:]])
            rows.setdefault(fields[0], []).append((poly, score, index[name]))
    return _collect(rows)


def write_json_predictions(
    path: str | Path,
    predictions: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    box_format: str = "poly",
) -> None:
    """Write the JSON list, one detection a line; ``box_format`` ``"poly"`` or ``"obb"``; names added if given."""
    if box_format not in ("poly", "obb"):
        raise ValueError(f"box_format must be 'poly' or 'obb', got {box_format!r}")
    entries = []
    for image_id, det in predictions.items():
        polys = _polys_of(det, str(image_id))
        boxes = poly_to_obb(torch.from_numpy(polys)).numpy() if box_format == "obb" else polys
        for box, score, label in zip(boxes, _numpy(det["scores"]).tolist(), _numpy(det["labels"]).tolist()):
            entry: dict[str, Any] = {"image_id": str(image_id), "label": int(label)}
            if class_names is not None:
                entry["class"] = class_names[int(label)]
            entry["score"] = float(score)
            entry[box_format] = [float(v) for v in box]
            entries.append(json.dumps(entry))
    Path(path).write_text("[\n" + ",\n".join(entries) + "\n]\n")


def _entries_with_lines(text: str, file: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos, line, counted_to = 0, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    pos = skip(0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{file}:{line_at(pos)}: expected a JSON list of predictions")
    pos = skip(pos + 1)
    entries: list[tuple[int, Any]] = []
    if pos < len(text) and text[pos] == "]":
        return entries
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{err.lineno}: invalid JSON: {err.msg}") from None
        entries.append((line_at(pos), value))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and skip(pos + 1) == len(text):
            return entries
        raise DataError(f"{file}:{line_at(pos)}: expected ',' or the closing ']' of the list")


def read_json_predictions(path: str | Path, class_names: Sequence[str] | None = None) -> Predictions:
    """Read the JSON list; a ``"class"`` name needs ``class_names`` and must agree with ``"label"`` if both given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prediction file not found")
    index = {name: i for i, name in enumerate(class_names or [])}
    rows: dict[str, list[tuple[np.ndarray, float, int]]] = {}
    for line, entry in _entries_with_lines(path.read_text(), str(path)):
        where = f"{path}:{line}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: each prediction must be an object, got {type(entry).__name__}")
        if "image_id" not in entry:
            raise DataError(f"{where}: missing 'image_id'")
        label = _label(entry, index, class_names, where)
        if not isinstance(entry.get("score"), (int, float)) or isinstance(entry.get("score"), bool):
            raise DataError(f"{where}: 'score' must be a number, got {entry.get('score')!r}")
        rows.setdefault(str(entry["image_id"]), []).append((_poly(entry, where), float(entry["score"]), label))
    return _collect(rows)


def _label(entry: dict[str, Any], index: dict[str, int], class_names: Sequence[str] | None, where: str) -> int:
    label = entry.get("label")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
        raise DataError(f"{where}: 'label' must be a class index >= 0, got {label!r}")
    if "class" in entry:
        if class_names is None:
            raise DataError(f"{where}: 'class' {entry['class']!r} given but no class names to map it to an index")
        if entry["class"] not in index:
            raise DataError(f"{where}: unknown class {entry['class']!r}; expected one of {list(class_names)}")
        if label is not None and label != index[entry["class"]]:
            named = index[entry["class"]]
            raise DataError(f"{where}: 'label' {label} disagrees with 'class' {entry['class']!r} (index {named})")
        return index[entry["class"]]
    if label is None:
        raise DataError(f"{where}: needs 'label' (class index) or 'class' (class name)")
    if class_names is not None and label >= len(class_names):
        raise DataError(f"{where}: 'label' {label} is out of range for {len(class_names)} classes")
    return label


def _poly(entry: dict[str, Any], where: str) -> np.ndarray:
    has_poly, has_obb = "poly" in entry, "obb" in entry
    if has_poly == has_obb:
        raise DataError(f"{where}: give exactly one of 'poly' (8 numbers) or 'obb' (cx, cy, w, h, angle)")
    key, size = ("poly", 8) if has_poly else ("obb", 5)
    values = entry[key]
    ok = isinstance(values, list) and len(values) == size
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok:
        raise DataError(f"{where}: {key!r} must be a list of {size} finite numbers, got {values!r}")
    arr = np.array(values, dtype=np.float64)
    return arr if has_poly else obb_to_poly(torch.from_numpy(arr[None])).numpy()[0]
