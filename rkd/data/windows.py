"""Window offsets for cutting large scenes: shared by tiling (training data) and ``rkd predict``; no torch."""

from __future__ import annotations


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``size`` pixels covering ``length``, neighbours sharing ``>= overlap``.

    The last window is flush with the end (it may share more than ``overlap``).

    >>> window_starts(1000, 400, 100)
    [0, 300, 600]
    >>> window_starts(300, 400, 100)
    [0]
    """
    if length <= size:
        return [0]
    step = size - overlap
    starts = list(range(0, length - size, step))
    return starts + [length - size]
