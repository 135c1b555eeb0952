"""HRSC2016 ship annotations: one ``HRSC_Image`` XML per image with rotated ``mbox_*`` boxes.

Layout (as HRSC2016 ships)::

    root/FullDataSet/Annotations/<id>.xml      (or root/Annotations/)
    root/FullDataSet/AllImages/<id>.bmp        (or root/AllImages/)
    root/ImageSets/<split>.txt                 (or ImageSets/Main/<split>.txt, <split>.txt)

Splits, image lookup, labels-only reading (no image folder) and problem
reporting follow :mod:`rkd.data.voc`; the size in the XML is
``Img_SizeHeight`` x ``Img_SizeWidth``.

**Angle.** ``mbox_ang`` is in radians in the image frame (y down), and
``mbox_w`` is the side along ``(cos a, sin a)``: exactly rkd's OBB tuple, so a
box only needs :func:`rkd.geometry.normalize_le90` (which swaps w/h when the
ship is labelled short side first and wraps the angle into ``[-pi/2, pi/2)``).
The bow point ``header_x, header_y`` lies on the long axis, which the tests use
to check the sign.

**Classes.** By default every object is one class, ``ship`` (the HRSC2016 level-1
task). Give ``classes`` other than ``["ship"]`` to use the fine-grained classes:
they are matched against each object's ``Class_ID`` text (e.g. ``"100000013"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rkd.data.sample import DetectionRecord, OnError, ReadReport
from rkd.data.voc import XmlDoc, XmlLayout, XmlObject, read_xml_dataset, xml_size

HRSC_CLASSES = ["ship"]
HRSC_LAYOUT = XmlLayout(
    "hrsc",
    ("FullDataSet/Annotations", "Annotations"),
    ("FullDataSet/AllImages", "AllImages"),
    ("ImageSets", "ImageSets/Main", "."),
)
MBOX_TAGS = ("mbox_cx", "mbox_cy", "mbox_w", "mbox_h", "mbox_ang")


def _parser(by_class_id: bool):
    def parse(doc: XmlDoc, report: ReadReport) -> tuple[tuple[int, int] | None, list[XmlObject]]:
        objects = []
        holder = doc.root.find("HRSC_Objects")
        for k, obj in enumerate(holder.findall("HRSC_Object") if holder is not None else [], start=1):
            what = f"HRSC_Object {k}"
            name = HRSC_CLASSES[0]
            if by_class_id:
                name = doc.text(obj, "Class_ID")
                if name is None:
                    report.problem(doc.where(obj), f"{what} has no <Class_ID>")
                    continue
            difficult = doc.flag(obj, "difficult", what, report)
            if difficult is None:
                continue
            values = [doc.number(obj, tag, what, report) for tag in MBOX_TAGS]
            if any(v is None for v in values):
                continue
            if values[2] <= 0 or values[3] <= 0:
                report.problem(doc.where(obj), f"{what} has an empty box: mbox_w {values[2]:g}, mbox_h {values[3]:g}")
                continue
            objects.append(XmlObject(name, values, difficult, doc.where(obj)))
        return xml_size(doc, doc.root, "Img_SizeHeight", "Img_SizeWidth", report), objects

    return parse


def hrsc_boxes(geometry: list[list[float]], wheres: list[str], report: ReadReport) -> tuple[Tensor, Tensor]:
    """le90 boxes of ``(cx, cy, w, h, angle)`` rows in HRSC's convention (see module doc).

    >>> import math
    >>> hrsc_boxes([[10.0, 20.0, 4.0, 8.0, 0.0]], ["a.xml:1"], ReadReport())[0]
    tensor([[10.0000, 20.0000,  8.0000,  4.0000, -1.5708]], dtype=torch.float64)
    """
    from rkd.geometry import normalize_le90

    boxes = normalize_le90(torch.tensor(geometry, dtype=torch.float64))
    return boxes, torch.ones(len(geometry), dtype=torch.bool)


def read_hrsc(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    """Records of one split, the class names (``["ship"]`` unless given) and a report."""
    report = ReadReport(on_error=on_error)
    by_class_id = class_names is not None and list(class_names) != HRSC_CLASSES
    names = list(class_names) if class_names is not None else list(HRSC_CLASSES)
    records, names = read_xml_dataset(Path(root), split, names, report, HRSC_LAYOUT, _parser(by_class_id), hrsc_boxes)
    return records, names, report
