"""Helpers the text/XML readers share: numbers with precise error messages, polygons to boxes.

Each helper returns ``None`` after reporting a problem through the
:class:`~rkd.data.sample.ReadReport`, so a reader skips the line (``on_error="skip"``)
or never gets there (``"raise"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rkd.data.sample import ReadReport

# Polygons with a smaller area (pixels^2) cannot be a labelled object.
MIN_POLYGON_AREA = 1e-6


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

    Degenerate polygons (all corners on a line) are reported at their ``where``
    and left out, so one bad line does not poison the file: the result is
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
        report.problem(wheres[i], "polygon has zero area (corners on a line)")
    boxes = poly_to_obb(p[keep].reshape(-1, 8)).to(torch.float32)
    return boxes, keep
