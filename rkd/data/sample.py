"""The one sample type every dataset format is read into.

Readers parse all labels eagerly into :class:`DetectionRecord` s (so a bad
label line fails at start-up, naming ``file:line``) and leave images on disk;
:meth:`DetectionRecord.load` reads the pixels when a sample is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rkd.errors import DataError

OnError = Literal["raise", "skip"]


@dataclass
class Sample:
    """One image with its objects.

    ``boxes`` are ``(N, 5)`` le90 ``(cx, cy, w, h, angle)`` in pixels of ``image``;
    ``orig_size`` is ``(H, W)`` of the file, ``scale`` the factor from file pixels
    to the pixels of ``image`` (1 until a resize such as letterbox).
    """

    image: Tensor  # (3, H, W) uint8 RGB
    boxes: Tensor  # (N, 5) float32
    labels: Tensor  # (N,) long
    difficult: Tensor  # (N,) bool
    image_id: str
    orig_size: tuple[int, int]
    scale: float = 1.0


@dataclass
class DetectionRecord:
    """An index entry: parsed labels of one image, whose pixels are read lazily.

    Exactly one of ``image_path`` (a file) and ``render`` (a picklable callable
    that returns a ``(3, H, W)`` uint8 tensor, used by generated data) is set.
    """

    image_id: str
    image_size: tuple[int, int]  # (H, W)
    boxes: Tensor  # (N, 5) float32 le90, pixels of the file
    labels: Tensor  # (N,) long
    difficult: Tensor  # (N,) bool
    image_path: Path | None = None
    render: Callable[[], Tensor] | None = None

    def load_image(self) -> Tensor:
        if self.render is not None:
            return self.render()
        if self.image_path is None:
            raise DataError(f"record {self.image_id!r} has no image file (annotation-only dataset)")
        from rkd.data.images import read_image

        image = read_image(self.image_path)
        if tuple(image.shape[1:]) != tuple(self.image_size):
            raise DataError(
                f"{self.image_path}: image is {tuple(image.shape[1:])} (H, W) "
                f"but its labels were indexed for {tuple(self.image_size)}"
            )
        return image

    def load(self, image: Tensor | None = None) -> Sample:
        """The sample, with ``image`` as its pixels when given (already loaded, e.g. kept in memory)."""
        return Sample(
            image=self.load_image() if image is None else image,
            boxes=self.boxes.clone(),
            labels=self.labels.clone(),
            difficult=self.difficult.clone(),
            image_id=self.image_id,
            orig_size=tuple(self.image_size),
        )


@dataclass
class ReadReport:
    """What a reader did: images and objects read, and every problem it skipped.

    With ``on_error="raise"`` :meth:`problem` raises :class:`DataError` at the first
    problem; with ``"skip"`` it records ``"where: why"`` in ``skipped`` and the
    reader drops the offending line (or file). Nothing is dropped silently.

    >>> r = ReadReport(on_error="skip")
    >>> r.problem("a.txt:3", "expected 9 fields, got 7")
    >>> r.skipped
    ['a.txt:3: expected 9 fields, got 7']
    """

    on_error: OnError = "raise"
    images: int = 0
    objects: int = 0
    skipped: list[str] = field(default_factory=list)
    horizontal: bool = False  # the format has axis-aligned boxes only (angle 0)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def problem(self, where: str, why: str) -> None:
        message = f"{where}: {why}"
        if self.on_error == "raise":
            raise DataError(message)
        self.skipped.append(message)


def empty_targets() -> tuple[Tensor, Tensor, Tensor]:
    """``(boxes (0, 5), labels (0,), difficult (0,))`` of an image without objects."""
    return torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
