"""XML annotation readers: Pascal VOC (horizontal ``bndbox``) and DIOR-R (oriented ``robndbox``).

Layout (Pascal VOC 2007; DIOR-R differs only in the folder names shown)::

    root/Annotations/<id>.xml          DIOR-R: root/Annotations/Oriented Bounding Boxes/<id>.xml
    root/JPEGImages/<id>.jpg           DIOR-R: JPEGImages-trainval/, JPEGImages-test/ (or JPEGImage/)
    root/ImageSets/Main/<split>.txt    one image id a line (also ImageSets/<split>.txt or <split>.txt)

**Splits.** A split is the id list ``<split>.txt`` found first in ``ImageSets/Main``,
``ImageSets`` or the root (VOC class lists ``id 1`` work too: the first field is
the id). A folder without any list (a fixture, an unsplit export) is read with
the split name ``all``: every annotation file, in sorted order.

**Images** are found by id (file stem) in every image folder that exists, and their
size comes from the header; a ``<size>`` in the XML that disagrees is a problem.
When *no* image folder exists the dataset is read as labels only (sizes from
``<size>``, ``image_path`` ``None``): statistics work, ``rkd data check`` reports
it, and loading pixels fails naming the record.

**Boxes.** ``bndbox`` corners are used as written (no VOC 1-based shift) and become
le90 boxes with :func:`rkd.geometry.hbb_to_obb`, as everywhere in rkd: ``w >= h``,
so a tall box gets angle ``-pi/2``; the report says ``horizontal``. DIOR-R's four
``robndbox`` corners become their minimum-area le90 rectangle (its ``<angle>``
field is redundant and ignored), and its records are
:class:`~rkd.data.parsing.PolygonRecord` objects that keep the corners as written, so that
``rkd evaluate`` takes the IoU of the labelled quadrilaterals as DOTA does.
``difficult`` is ``0`` or ``1`` (missing: ``0``).

**Problems** (XML that does not parse, a bad number, an empty box, a listed id
without annotation, a missing image) are reported as ``file:line: ...`` with
the XML element named; ``on_error="skip"`` drops the object (bad object) or
the image (bad file), and lists it in the :class:`~rkd.data.sample.ReadReport`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat

import torch
from torch import Tensor

from rkd.data.images import find_images, image_size
from rkd.data.parsing import PolygonRecord, parse_float, polygon_record
from rkd.data.sample import DetectionRecord, OnError, ReadReport, empty_targets
from rkd.errors import DataError

ALL_SPLIT = "all"


class XmlDoc:
    """A parsed XML file that remembers the line each element starts on."""

    def __init__(self, path: Path, root: Element, lines: dict[Element, int]) -> None:
        self.path, self.root, self.lines = path, root, lines

    def where(self, element: Element) -> str:
        return f"{self.path}:{self.lines.get(element, 1)}"

    def text(self, parent: Element, tag: str) -> str | None:
        child = parent.find(tag)
        if child is None or child.text is None or not child.text.strip():
            return None
        return child.text.strip()

    def number(self, parent: Element, tag: str, what: str, report: ReadReport) -> float | None:
        """The float in ``<tag>`` under ``parent``; missing or bad is a problem naming ``what``."""
        child = parent.find(tag)
        if child is None or child.text is None or not child.text.strip():
            report.problem(self.where(parent), f"{what}: <{parent.tag}> has no <{tag}>")
            return None
        return parse_float(child.text.strip(), f"{what} <{tag}>", self.where(child), report)

    def flag(self, parent: Element, tag: str, what: str, report: ReadReport) -> bool | None:
        """A ``0``/``1`` flag such as ``<difficult>`` (missing counts as 0)."""
        text = self.text(parent, tag)
        if text is None:
            return False
        if text not in ("0", "1"):
            report.problem(self.where(parent.find(tag)), f"{what} <{tag}> {text!r} must be 0 or 1")
            return None
        return text == "1"


def parse_xml(path: Path, report: ReadReport) -> XmlDoc | None:
    """The document of ``path`` with element line numbers, or ``None`` after reporting why not.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "a.xml"
    ...     _ = p.write_text("<a>\\n  <b>1</b>\\n</a>")
    ...     doc = parse_xml(p, ReadReport())
    ...     doc.where(doc.root.find("b")).endswith("a.xml:2")
    True
    """
    builder = TreeBuilder()
    lines: dict[Element, int] = {}
    parser = expat.ParserCreate()
    parser.buffer_text = True

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        data = path.read_bytes()
    except OSError as e:
        report.problem(str(path), f"cannot read annotation: {e.strerror or e}")
        return None
    try:
        parser.Parse(data, True)
        root = builder.close()
    except expat.ExpatError as e:
        why = f"XML does not parse: {expat.errors.messages[e.code]} (column {e.offset + 1})"
        report.problem(f"{path}:{e.lineno}", why)
        return None
    except AssertionError:  # TreeBuilder.close on a document expat stopped early
        report.problem(str(path), "XML does not parse: no complete root element")
        return None
    return XmlDoc(path, root, lines)


@dataclass(frozen=True)
class XmlLayout:
    """Where a format keeps its files, relative to the dataset root (first existing wins)."""

    name: str  # the format, for messages
    annotation_dirs: tuple[str, ...]
    image_dirs: tuple[str, ...]  # every existing one is searched
    list_dirs: tuple[str, ...]  # folders that may hold <split>.txt


@dataclass
class XmlObject:
    name: str
    geometry: list[float]  # bndbox xyxy, polygon (8) or obb (5): the format's to_boxes decides
    difficult: bool
    where: str


# parse(doc, report) -> ((H, W) from the XML or None, objects)
ObjectParser = Callable[[XmlDoc, ReadReport], tuple[tuple[int, int] | None, list[XmlObject]]]
# to_boxes(geometries, wheres, report) -> (le90 boxes (K, 5), keep (N,) bool)
BoxMaker = Callable[[list[list[float]], list[str], ReadReport], tuple[Tensor, Tensor]]

VOC_LAYOUT = XmlLayout("voc", ("Annotations",), ("JPEGImages",), ("ImageSets/Main", "ImageSets", "."))
DIOR_LAYOUT = XmlLayout(
    "dior",
    ("Annotations/Oriented Bounding Boxes", "Annotations"),
    ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages", "JPEGImage"),
    ("ImageSets/Main", "ImageSets", "."),
)
DIOR_CORNERS = (
    "x_left_top", "y_left_top", "x_right_top", "y_right_top",
    "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom",
)  # fmt: skip


def split_ids(
    root: Path, split: str, layout: XmlLayout, annotation_dir: Path, report: ReadReport
) -> list[tuple[str, str]]:
    """``(image id, where it was listed)`` of a split (see module doc for the rule)."""
    candidates = [root / d / f"{split}.txt" for d in layout.list_dirs]
    for list_path in candidates:
        if not list_path.is_file():
            continue
        ids: list[tuple[str, str]] = []
        first_line: dict[str, int] = {}
        text = list_path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{list_path}:{lineno}"
            if fields[0] in first_line:
                report.problem(where, f"id {fields[0]!r} is listed twice (first at line {first_line[fields[0]]})")
                continue
            first_line[fields[0]] = lineno
            ids.append((fields[0], where))
        return ids
    if split == ALL_SPLIT:
        return [(p.stem, str(p)) for p in sorted(annotation_dir.glob("*.xml"))]
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"{root}: no {layout.name} split {split!r} (looked for {tried}); split 'all' reads every annotation"
    )


def first_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no {what} folder (looked for {', '.join(names)})")


def image_index(root: Path, layout: XmlLayout) -> tuple[dict[str, Path], list[Path]]:
    """Images by id over every existing image folder, and those folders (empty: labels only)."""
    dirs = [root / d for d in layout.image_dirs if (root / d).is_dir()]
    images: dict[str, Path] = {}
    for folder in dirs:
        for image_id, path in find_images(folder).items():
            images.setdefault(image_id, path)
    return images, dirs


def read_xml_dataset(
    root: Path,
    split: str,
    class_names: list[str] | None,
    report: ReadReport,
    layout: XmlLayout,
    parse: ObjectParser,
    to_boxes: BoxMaker | None,
) -> tuple[list[DetectionRecord], list[str]]:
    """Records and class names of one split of an XML-per-image dataset (see module doc).

    ``to_boxes`` makes the le90 boxes of the objects' geometries; ``None`` when the geometries
    are 4-corner polygons, which the records then keep as written (:func:`polygon_record`).
    """
    root = Path(root)
    annotation_dir = first_dir(root, layout.annotation_dirs, f"{layout.name} annotation")
    images, image_dirs = image_index(root, layout)
    parsed = []  # (image id, path, size, objects) of every usable file
    for image_id, listed_at in split_ids(root, split, layout, annotation_dir, report):
        xml_path = annotation_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            report.problem(listed_at, f"no annotation {xml_path}")
            continue
        doc = parse_xml(xml_path, report)
        if doc is None:
            continue
        xml_size, objects = parse(doc, report)
        if image_dirs:
            image_path = images.get(image_id)
            if image_path is None:
                report.problem(str(xml_path), f"no image {image_id}.* in {', '.join(str(d) for d in image_dirs)}")
                continue
            try:
                size = image_size(image_path)
            except DataError as e:
                report.problem(str(image_path), str(e).removeprefix(f"{image_path}: "))
                continue
            if xml_size is not None and xml_size != size:
                report.problem(str(xml_path), f"<size> says (H, W) {xml_size} but image {image_path.name} is {size}")
                continue
        else:
            image_path, size = None, xml_size
            if size is None:
                report.problem(str(xml_path), "no image folder and no image size in the annotation")
                continue
        parsed.append((image_id, image_path, size, objects))

    if class_names is None:
        names = sorted({o.name for *_, objects in parsed for o in objects})
    else:
        names = list(class_names)
    index = {name: i for i, name in enumerate(names)}
    records = []
    for image_id, image_path, size, objects in parsed:
        known = []
        for o in objects:
            if o.name in index:
                known.append(o)
            else:
                report.problem(o.where, f"class {o.name!r} is not one of the {len(names)} class names {names}")
        geometry, wheres = [o.geometry for o in known], [o.where for o in known]
        labels = torch.tensor([index[o.name] for o in known], dtype=torch.long)
        difficulty = torch.tensor([o.difficult for o in known], dtype=torch.long)
        if to_boxes is None:
            record = polygon_record(image_id, size, geometry, labels, difficulty, wheres, report, image_path)
        elif known:
            boxes, keep = to_boxes(geometry, wheres, report)
            record = DetectionRecord(
                image_id, size, boxes.float(), labels[keep], difficulty[keep] != 0, image_path=image_path
            )
        else:
            record = DetectionRecord(image_id, size, *empty_targets(), image_path=image_path)
        records.append(record)
        report.images += 1
        report.objects += len(record.labels)
    return records, names


def xml_size(doc: XmlDoc, parent: Element | None, height_tag: str, width_tag: str, report: ReadReport):
    """``(H, W)`` stated in the XML, or ``None`` if absent or zero (many exports write 0)."""
    if parent is None or doc.text(parent, height_tag) is None or doc.text(parent, width_tag) is None:
        return None
    height = doc.number(parent, height_tag, "image size", report)
    width = doc.number(parent, width_tag, "image size", report)
    if height is None or width is None or height <= 0 or width <= 0:
        return None
    return int(round(height)), int(round(width))


def _object_header(doc: XmlDoc, obj: Element, what: str, report: ReadReport) -> tuple[str, bool] | None:
    name = doc.text(obj, "name")
    if name is None:
        report.problem(doc.where(obj), f"{what} has no <name>")
        return None
    difficult = doc.flag(obj, "difficult", what, report)
    return None if difficult is None else (name, difficult)


def _objects_with_box(
    doc: XmlDoc, report: ReadReport, box_tag: str, fields: tuple[str, ...]
) -> list[tuple[str, XmlObject, Element]]:
    """``(what, object, box element)`` of every ``<object>`` whose name, difficult flag and
    ``box_tag`` numbers ``fields`` parse (problems are reported)."""
    out = []
    for k, obj in enumerate(doc.root.findall("object"), start=1):
        what = f"object {k}"
        header = _object_header(doc, obj, what, report)
        if header is None:
            continue
        box = obj.find(box_tag)
        if box is None:
            report.problem(doc.where(obj), f"{what} has no <{box_tag}>")
            continue
        coords = [doc.number(box, tag, what, report) for tag in fields]
        if any(c is None for c in coords):
            continue
        out.append((what, XmlObject(header[0], coords, header[1], doc.where(obj)), box))
    return out


def parse_voc_objects(doc: XmlDoc, report: ReadReport) -> tuple[tuple[int, int] | None, list[XmlObject]]:
    """Size and ``bndbox`` objects (geometry ``[xmin, ymin, xmax, ymax]``) of a VOC annotation."""
    objects = []
    for what, obj, box in _objects_with_box(doc, report, "bndbox", ("xmin", "ymin", "xmax", "ymax")):
        x1, y1, x2, y2 = obj.geometry
        if x2 <= x1 or y2 <= y1:
            report.problem(doc.where(box), f"{what} <bndbox> is empty: xmin {x1:g} xmax {x2:g} ymin {y1:g} ymax {y2:g}")
            continue
        objects.append(obj)
    return xml_size(doc, doc.root.find("size"), "height", "width", report), objects


def parse_dior_objects(doc: XmlDoc, report: ReadReport) -> tuple[tuple[int, int] | None, list[XmlObject]]:
    """Size and ``robndbox`` objects (geometry: the 8 corner coordinates) of a DIOR-R annotation."""
    objects = [obj for _, obj, _ in _objects_with_box(doc, report, "robndbox", DIOR_CORNERS)]
    return xml_size(doc, doc.root.find("size"), "height", "width", report), objects


def hbb_geometry_to_boxes(geometry: list[list[float]], wheres: list[str], report: ReadReport) -> tuple[Tensor, Tensor]:
    from rkd.geometry import hbb_to_obb

    boxes = hbb_to_obb(torch.tensor(geometry, dtype=torch.float64))
    return boxes, torch.ones(len(geometry), dtype=torch.bool)


def read_voc(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    """Records of one split of a Pascal VOC dataset, the class names (sorted found names unless given), a report."""
    report = ReadReport(on_error=on_error, horizontal=True)
    records, names = read_xml_dataset(
        Path(root), split, class_names, report, VOC_LAYOUT, parse_voc_objects, hbb_geometry_to_boxes
    )
    return records, names, report


def read_dior(
    root: Path, split: str, class_names: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[PolygonRecord], list[str], ReadReport]:
    """Records of one split of a DIOR-R dataset, the class names (sorted found names unless given), a report.

    The records keep each object's 4 ``robndbox`` corners as written (``polygons``) and its
    ``<difficult>`` as ``difficulty`` 0/1 beside the le90 ``boxes`` (see module doc).
    """
    report = ReadReport(on_error=on_error)
    records, names = read_xml_dataset(Path(root), split, class_names, report, DIOR_LAYOUT, parse_dior_objects, None)
    return records, names, report
