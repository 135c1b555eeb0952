"""Helpers the text/XML readers share: UTF-8 lines, numbers with precise error messages, polygons to boxes and records.

Each helper returns ``None`` after reporting a problem through the
:class:`~rkd.data.sample.ReadReport`, so a reader skips the line (``on_error="skip"``)
or never gets there (``"raise"``). A degenerate polygon is not such a problem:
DOTA's devkit writes them at patch borders, so the line is dropped with a warning
in ``report.skipped`` whatever ``on_error`` says (see :func:`drop`).
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rkd.data.images import image_size
from rkd.data.sample import DetectionRecord, ReadReport
from rkd.errors import DataError

# Polygons with a smaller area (pixels^2) cannot be a labelled object.
MIN_POLYGON_AREA = 1e-6


@dataclass
class PolygonRecord(DetectionRecord):
    """A record whose labels are polygons: the polygons as written, for evaluation, beside the le90 ``boxes``.

    ``polygons`` (N, 8) float64 file pixels, row i the polygon of ``boxes[i]``;
    ``difficulty`` (N,) long, the difficulty values as written (DOTA's splitter
    writes 2 for objects cut by a patch border; any non-zero value is difficult).
    """

    polygons: Tensor | None = None
    difficulty: Tensor | None = None


def header_size(path: Path, report: ReadReport) -> tuple[int, int] | None:
    """``(H, W)`` of an image, or None after reporting a header that does not read, so that the
    other images of the split (and their label problems) are still read."""
    try:
        return image_size(path)
    except DataError as e:
        report.problem(str(path), str(e).removeprefix(f"{path}: "))
        return None


def outside_boxes(boxes: Tensor, size: tuple[int, int]) -> list[int]:
    """Indices of the le90 ``boxes`` (N, 5) lying entirely outside an image of ``size`` (H, W).

    >>> outside_boxes(torch.tensor([[5.0, 5, 4, 4, 0], [30, 5, 4, 4, 0], [11, 5, 4, 4, 0.5]]), (10, 10))
    [1]
    """
    cx, cy, w, h, a = boxes.double().unbind(-1) if len(boxes) else (torch.zeros(0),) * 5
    ex = (w / 2 * torch.cos(a)).abs() + (h / 2 * torch.sin(a)).abs()  # half-extents of the circumscribed box
    ey = (w / 2 * torch.sin(a)).abs() + (h / 2 * torch.cos(a)).abs()
    out = (cx + ex <= 0) | (cx - ex >= size[1]) | (cy + ey <= 0) | (cy - ey >= size[0])
    return out.nonzero().flatten().tolist()


def drop(report: ReadReport, where: str, why: str) -> None:
    """Record a line left out on purpose (never raises): it is counted and listed in ``report.skipped``."""
    report.skipped.append(f"{where}: {why}; line dropped")


def read_text_lines(path: Path, report: ReadReport) -> list[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; a byte-order mark is dropped, other encodings are problems.

    Each line that is not valid UTF-8 is a problem naming ``file:line`` (a label
    saved in a legacy encoding would otherwise pass as a new class name).
    """
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        report.problem(f"{path}:1", "file is UTF-16 text; label files must be UTF-8")
        return []
    raw = raw.removeprefix(codecs.BOM_UTF8)
    lines = []
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append((lineno, chunk.decode("utf-8")))
        except UnicodeDecodeError as err:
            bad = chunk[err.start]
            report.problem(
                f"{path}:{lineno}",
                f"not UTF-8 text (byte 0x{bad:02x} at column {err.start + 1}); save the file as UTF-8",
            )
    return lines


def parse_float(text: str, what: str, where: str, report: ReadReport) -> float | None:
    """``float(text)``; a non-number or non-finite value is a problem at ``where``.

    >>> parse_float("1.5", "coordinate", "a.txt:1", ReadReport())
    1.5
    >>> r = ReadReport(on_error="skip")
    >>> parse_float("abc", "coordinate", "a.txt:1", r) is None, r.skipped
    (True, ["a.txt:1: coordinate 'abc' is not a number"])
    """
    try:
        value = float(text)
    except ValueError:
        report.problem(where, f"{what} {text!r} is not a number")
        return None
    if not math.isfinite(value):
        report.problem(where, f"{what} {text!r} is not finite")
        return None
    return value


def parse_int(text: str, what: str, where: str, report: ReadReport) -> int | None:
    """``int(text)``; anything else is a problem at ``where``."""
    try:
        return int(text)
    except ValueError:
        report.problem(where, f"{what} {text!r} is not an integer")
        return None


def parse_coords(fields: list[str], where: str, report: ReadReport) -> list[float] | None:
    """All ``fields`` as finite floats, or ``None`` after reporting the first bad one."""
    coords = []
    for text in fields:
        value = parse_float(text, "coordinate", where, report)
        if value is None:
            return None
        coords.append(value)
    return coords


def polygons_to_boxes(polys: list[list[float]], wheres: list[str], report: ReadReport) -> tuple[Tensor, Tensor]:
    """Minimum-area le90 boxes of the usable ones of ``(N, 8)`` pixel polygons, and the keep mask.

    Degenerate polygons (zero area: all corners on a line, as DOTA's splitter
    writes at patch borders) cannot be an object: they are dropped with a warning
    at their ``where`` (:func:`drop`), never failing the read. The result is
    ``(boxes (K, 5) float32, keep (N,) bool)`` with ``K = keep.sum()``.
    """
    from rkd.geometry import poly_to_obb

    if not polys:
        return torch.zeros(0, 5), torch.zeros(0, dtype=torch.bool)
    p = torch.tensor(polys, dtype=torch.float64).view(-1, 4, 2)
    # Shoelace area: the minimum-area rectangle of a zero-area polygon has no defined angle.
    x, y = p[..., 0], p[..., 1]
    area = 0.5 * (x * y.roll(-1, dims=1) - x.roll(-1, dims=1) * y).sum(dim=1).abs()
    keep = area > MIN_POLYGON_AREA
    for i in torch.nonzero(~keep).flatten().tolist():  # only runs for bad lines
        drop(report, wheres[i], "polygon has zero area (corners on a line)")
    boxes = poly_to_obb(p[keep].reshape(-1, 8)).to(torch.float32)
    return boxes, keep


def polygon_record(
    image_id: str,
    size: tuple[int, int],
    polys: list[list[float]],
    labels: Tensor,
    difficulty: Tensor,
    wheres: list[str],
    report: ReadReport,
    image_path: Path | None = None,
) -> PolygonRecord:
    """The record of an image whose labels are 4-corner polygons ``polys`` (N lists of 8 file pixels).

    ``labels`` and ``difficulty`` (N,) long are row for row with ``polys``. The record keeps
    the polygons as written (evaluation takes their IoU, as DOTA's devkit does) beside their
    minimum-area le90 boxes (training targets, exactly :func:`polygons_to_boxes`), and
    ``difficult`` where ``difficulty`` is non-zero. A degenerate polygon is dropped from every
    field alike, so that row i of each is the same object.
    """
    boxes, keep = polygons_to_boxes(polys, wheres, report)
    polygons = torch.tensor(polys, dtype=torch.float64).reshape(-1, 8)[keep]
    labels, difficulty = labels[keep], difficulty[keep]
    return PolygonRecord(
        image_id, size, boxes, labels, difficulty != 0, image_path=image_path, polygons=polygons, difficulty=difficulty
    )
