"""The detection dataset formats rkd reads, by name: :data:`READERS`.

A reader is called ``reader(root, split, classes=None, on_error="raise")`` and returns the split's
records, its class names and a :class:`~rkd.data.sample.ReadReport`. Scene folders (classification)
have no boxes, so they are not here: :mod:`rkd.data.scenes`.
"""

from __future__ import annotations

from collections.abc import Callable

from rkd.data.coco import read_coco
from rkd.data.dota import read_dota
from rkd.data.hrsc import read_hrsc
from rkd.data.sample import DetectionRecord, ReadReport
from rkd.data.ucas import read_ucas
from rkd.data.voc import read_dior, read_voc

Reader = Callable[..., tuple[list[DetectionRecord], list[str], ReadReport]]
READERS: dict[str, Reader] = {
    "ucas": read_ucas,
    "dota": read_dota,
    "voc": read_voc,
    "dior": read_dior,
    "hrsc": read_hrsc,
    "coco": read_coco,
}
