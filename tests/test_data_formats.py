"""VOC, DIOR-R, HRSC2016, COCO and scene-folder readers against independent parses of the real files."""

from __future__ import annotations

import json
import math
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapely.geometry import Point, Polygon, box

from rkd.data.coco import read_coco
from rkd.data.dataset import build_dataset, validate_data_spec
from rkd.data.formats import READERS
from rkd.data.hrsc import read_hrsc
from rkd.data.images import read_image
from rkd.data.scenes import read_scenes
from rkd.data.voc import read_dior, read_voc
from rkd.errors import DataError
from rkd.geometry import obb_to_poly

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NEPU = SHARED / "nepu_owod"
DIOR = SHARED / "fixtures" / "dior"
HRSC = SHARED / "fixtures" / "hrsc"
AID = SHARED / "aid150"


def needs(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"{path} not present")


def le90_ok(boxes: torch.Tensor) -> bool:
    return bool(((boxes[:, 2] >= boxes[:, 3]) & (boxes[:, 4] >= -math.pi / 2) & (boxes[:, 4] < math.pi / 2)).all())


def box_polygon(b) -> Polygon:
    return Polygon(np.asarray(obb_to_poly(torch.as_tensor(b, dtype=torch.float64)[None])[0]).reshape(4, 2))


def test_every_format_is_registered():
    assert {"ucas", "dota", "voc", "dior", "hrsc", "coco"} <= set(READERS)
    assert "scenes" not in READERS  # classification folders are not a detection reader


# ---------------------------------------------------------------- VOC on NEPU_OWOD


@needs(NEPU)
@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_matches_an_independent_parse(split):
    records, names, report = read_voc(NEPU, split)
    ids = (NEPU / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    assert [r.image_id for r in records] == ids and names == ["oilwell"]
    assert report.skipped == [] and report.horizontal and report.images == len(ids)
    total = 0
    for record in records:
        root = ET.parse(NEPU / "Annotations" / f"{record.image_id}.xml").getroot()
        with Image.open(NEPU / "JPEGImages" / f"{record.image_id}.jpg") as im:
            assert record.image_size == (im.height, im.width)
        objects = root.findall("object")
        assert len(record.boxes) == len(objects)
        assert le90_ok(record.boxes)
        for obj, b, hard in zip(objects, record.boxes.double(), record.difficult):
            x1, y1, x2, y2 = (float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            ref = box(x1, y1, x2, y2)
            mine = box_polygon(b)
            assert mine.symmetric_difference(ref).area < 1e-6 * ref.area
            assert bool(hard) == (obj.find("difficult").text == "1")
        total += len(objects)
    assert report.objects == total == (248 if split == "train" else 76)


@needs(NEPU)
def test_voc_spec_builds_letterboxed_samples():
    spec = validate_data_spec({"format": "voc", "root": str(NEPU), "input_size": 256})
    dataset = build_dataset(spec, "val", train=False)
    sample = dataset[0]
    assert len(dataset) == 30 and sample.image.shape == (3, 256, 256) and dataset.class_names == ["oilwell"]
    assert sample.boxes.shape[1] == 5 and len(sample.boxes) == len(dataset.records[0].labels)


# ---------------------------------------------------------------- DIOR-R


@needs(DIOR)
def test_dior_fixture_corners_become_their_rectangle():
    records, names, report = read_dior(DIOR, "demo")
    root = ET.parse(DIOR / "Annotations" / "Oriented Bounding Boxes" / "00001.xml").getroot()
    corners = [
        (float(o.find(f"robndbox/x_{s}").text), float(o.find(f"robndbox/y_{s}").text))
        for o in root.findall("object")
        for s in ("left_top", "right_top", "right_bottom", "left_bottom")
    ]
    assert names == ["golffield"] and len(records) == 1 and report.skipped == []
    record = records[0]
    assert record.image_size == (800, 800) and record.image_path == DIOR / "JPEGImage" / "00001.jpg"
    ref = Polygon(corners)
    assert box_polygon(record.boxes[0].double()).symmetric_difference(ref).area < 1e-6 * ref.area
    assert le90_ok(record.boxes)
    assert [r.image_id for r in read_dior(DIOR, "all")[0]] == ["00001"]  # no list: every annotation


DIOR_XML = """<?xml version="1.0"?>
<annotation>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}
</annotation>
"""
DIOR_OBJECT = """  <object>
    <name>{name}</name>
    <difficult>{difficult}</difficult>
    <robndbox>
      <x_left_top>{0}</x_left_top><y_left_top>{1}</y_left_top>
      <x_right_top>{2}</x_right_top><y_right_top>{3}</y_right_top>
      <x_right_bottom>{4}</x_right_bottom><y_right_bottom>{5}</y_right_bottom>
      <x_left_bottom>{6}</x_left_bottom><y_left_bottom>{7}</y_left_bottom>
    </robndbox>
  </object>"""


def rotated_corners(cx, cy, w, h, angle) -> list[float]:
    """Corners of a w x h rectangle turned by ``angle`` (image frame, y down), by hand."""
    c, s = math.cos(angle), math.sin(angle)
    out = []
    for du, dv in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        out += [cx + du * c - dv * s, cy + du * s + dv * c]
    return out


def test_dior_rotated_objects_keep_their_angle(tmp_path):
    rects = [(60.0, 40.0, 50.0, 12.0, math.radians(30)), (30.0, 70.0, 10.0, 30.0, math.radians(-20))]
    objects = "\n".join(
        DIOR_OBJECT.format(*[f"{v:.6f}" for v in rotated_corners(*r)], name="ship", difficult=i)
        for i, r in enumerate(rects)
    )
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(DIOR_XML.format(w=100, h=90, objects=objects))
    Image.new("RGB", (100, 90)).save(tmp_path / "JPEGImages" / "a.jpg")
    records, names, _ = read_dior(tmp_path, "all")
    b = records[0].boxes.double()
    # the first is long along 30 deg; the second is tall: its long side (the h-axis) points at -20 + 90 = 70 deg
    assert b[0].tolist() == pytest.approx([60, 40, 50, 12, math.radians(30)], abs=1e-4)
    assert b[1].tolist() == pytest.approx([30, 70, 30, 10, math.radians(70)], abs=1e-4)
    assert records[0].difficult.tolist() == [False, True] and names == ["ship"]


# ---------------------------------------------------------------- HRSC2016


@needs(HRSC)
def test_hrsc_fixture_angle_points_at_the_bow():
    records, names, report = read_hrsc(HRSC, "demo")
    obj = ET.parse(HRSC / "FullDataSet" / "Annotations" / "100000006.xml").getroot().find("HRSC_Objects/HRSC_Object")
    cx, cy, w, h, a = (float(obj.find(t).text) for t in ("mbox_cx", "mbox_cy", "mbox_w", "mbox_h", "mbox_ang"))
    bow = Point(float(obj.find("header_x").text), float(obj.find("header_y").text))
    assert names == ["ship"] and len(records) == 1 and report.skipped == []
    record = records[0]
    assert record.image_size == (816, 1172) and record.image_path is None  # the fixture has no image
    b = record.boxes[0].double()
    ref = Polygon(np.array(rotated_corners(cx, cy, w, h, a)).reshape(4, 2))
    assert box_polygon(b).symmetric_difference(ref).area < 1e-4 * ref.area
    assert le90_ok(record.boxes)
    # The bow lies on the long axis, near one end: far from the axis line it would mean a wrong angle sign.
    ux, uy = math.cos(float(b[4])), math.sin(float(b[4]))
    dx, dy = bow.x - float(b[0]), bow.y - float(b[1])
    assert abs(-dx * uy + dy * ux) < float(b[3]) / 4 and abs(dx * ux + dy * uy) > 0.4 * float(b[2])
    with pytest.raises(DataError, match="annotation-only"):
        record.load_image()


HRSC_XML = """<HRSC_Image>
  <Img_SizeWidth>64</Img_SizeWidth>
  <Img_SizeHeight>48</Img_SizeHeight>
  <HRSC_Objects>
    <HRSC_Object>
      <Class_ID>100000002</Class_ID>
      <difficult>0</difficult>
      <mbox_cx>30</mbox_cx><mbox_cy>20</mbox_cy><mbox_w>10</mbox_w><mbox_h>30</mbox_h>
      <mbox_ang>{angle}</mbox_ang>
    </HRSC_Object>
  </HRSC_Objects>
</HRSC_Image>
"""


def write_hrsc(root: Path, angle: str = "0.5", image_size=(64, 48)) -> Path:
    (root / "FullDataSet" / "Annotations").mkdir(parents=True)
    (root / "FullDataSet" / "AllImages").mkdir(parents=True)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "test.txt").write_text("1\n")
    path = root / "FullDataSet" / "Annotations" / "1.xml"
    path.write_text(HRSC_XML.format(angle=angle))
    Image.new("RGB", image_size).save(root / "FullDataSet" / "AllImages" / "1.bmp")
    return path


def test_hrsc_short_side_first_and_class_ids(tmp_path):
    write_hrsc(tmp_path)
    records, names, _ = read_hrsc(tmp_path, "test")
    # w=10 along 0.5 rad, h=30 across: the long side is the h-axis, at 0.5 + pi/2 -> wrapped to 0.5 - pi/2
    assert records[0].boxes[0].tolist() == pytest.approx([30, 20, 30, 10, 0.5 - math.pi / 2], abs=1e-5)
    assert records[0].image_path.name == "1.bmp" and records[0].image_size == (48, 64)
    _, fine, _ = read_hrsc(tmp_path, "test", ["100000002", "100000005"])
    assert fine == ["100000002", "100000005"]


def test_hrsc_bad_angle_names_its_line(tmp_path):
    path = write_hrsc(tmp_path, angle="north")
    with pytest.raises(DataError) as err:
        read_hrsc(tmp_path, "test")
    assert str(err.value) == f"{path}:9: HRSC_Object 1 <mbox_ang> 'north' is not a number"
    records, _, report = read_hrsc(tmp_path, "test", on_error="skip")
    assert len(records) == 1 and len(records[0].labels) == 0 and report.skipped == [str(err.value)]


def test_hrsc_image_size_disagreeing_with_xml_is_a_problem(tmp_path):
    path = write_hrsc(tmp_path, image_size=(65, 48))
    with pytest.raises(DataError, match=rf"^{path}: <size> says \(H, W\) \(48, 64\) but image 1.bmp is \(48, 65\)$"):
        read_hrsc(tmp_path, "test")


# ---------------------------------------------------------------- policies on a written VOC set

VOC_XML = """<annotation>
  <size>
    <width>40</width>
    <height>30</height>
  </size>
  <object>
    <name>well</name>
    <difficult>0</difficult>
    <bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>9</ymax></bndbox>
  </object>
  <object>
    <name>tank</name>
    <difficult>1</difficult>
    <bndbox>
      <xmin>{xmin}</xmin>
      <ymin>5</ymin>
      <xmax>25</xmax>
      <ymax>29</ymax>
    </bndbox>
  </object>
</annotation>
"""


def write_voc(root: Path, ids=("a", "b", "c")) -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for i in ids:
        (root / "Annotations" / f"{i}.xml").write_text(VOC_XML.format(xmin=20))
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{i}.png")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_written_set_reads_clean(tmp_path):
    records, names, report = read_voc(write_voc(tmp_path), "train")
    assert names == ["tank", "well"] and report.skipped == [] and report.objects == 6
    b = records[0].boxes
    assert b[0].tolist() == pytest.approx([7, 6, 10, 6, 0])
    assert b[1].tolist() == pytest.approx([22.5, 17, 24, 5, -math.pi / 2])  # tall: le90 turns it
    assert records[0].labels.tolist() == [1, 0] and records[0].difficult.tolist() == [False, True]


def test_voc_bad_number_broken_xml_and_missing_image(tmp_path):
    root = write_voc(tmp_path)
    bad_number = root / "Annotations" / "a.xml"
    bad_number.write_text(VOC_XML.format(xmin="2O"))
    broken = root / "Annotations" / "b.xml"
    broken.write_text(VOC_XML.format(xmin=20).replace("</object>\n</annotation>", "</object>\n"))
    (root / "JPEGImages" / "c.png").unlink()

    with pytest.raises(DataError) as err:
        read_voc(root, "train")
    assert str(err.value) == f"{bad_number}:15: object 2 <xmin> '2O' is not a number"

    records, names, report = read_voc(root, "train", on_error="skip")
    assert report.skipped == [
        f"{bad_number}:15: object 2 <xmin> '2O' is not a number",
        f"{broken}:22: XML does not parse: no element found (column 1)",
        f"{root / 'Annotations' / 'c.xml'}: no image c.* in {root / 'JPEGImages'}",
    ]
    # a keeps its good object; b and c are dropped whole
    assert [r.image_id for r in records] == ["a"] and records[0].labels.tolist() == [0] and names == ["well"]
    assert report.images == 1 and report.objects == 1


def test_voc_list_problems_name_the_list_line(tmp_path):
    root = write_voc(tmp_path)
    listing = root / "ImageSets" / "Main" / "train.txt"
    listing.write_text("a\nzz\na\n")
    records, _, report = read_voc(root, "train", on_error="skip")
    assert report.skipped == [
        f"{listing}:3: id 'a' is listed twice (first at line 1)",
        f"{listing}:2: no annotation {root / 'Annotations' / 'zz.xml'}",
    ]
    with pytest.raises(DataError, match="no voc split 'test'"):
        read_voc(root, "test")


def test_voc_unknown_class_and_empty_box(tmp_path):
    root = write_voc(tmp_path, ids=("a",))
    path = root / "Annotations" / "a.xml"
    path.write_text(VOC_XML.format(xmin=30))
    _, _, report = read_voc(root, "train", ["well"], on_error="skip")
    assert report.skipped == [f"{path}:14: object 2 <bndbox> is empty: xmin 30 xmax 25 ymin 5 ymax 29"]
    path.write_text(VOC_XML.format(xmin=20))
    with pytest.raises(DataError) as err:
        read_voc(root, "train", ["well"])
    assert str(err.value) == f"{path}:11: class 'tank' is not one of the 1 class names ['well']"


# ---------------------------------------------------------------- COCO


def write_coco(root: Path, annotations: list[dict]) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    Image.new("RGB", (50, 40)).save(root / "val" / "p.jpg")
    Image.new("RGB", (20, 20)).save(root / "val" / "q.jpg")
    doc = {
        "images": [{"id": 7, "file_name": "p.jpg", "width": 50, "height": 40}, {"id": 8, "file_name": "q.jpg"}],
        "categories": [{"id": 3, "name": "ship"}, {"id": 1, "name": "plane"}],
        "annotations": annotations,
    }
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def test_coco_boxes_crowd_and_category_order(tmp_path):
    anns = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 8], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 12.5], "iscrowd": 1},
    ]
    write_coco(tmp_path, anns)
    records, names, report = read_coco(tmp_path, "val")
    assert names == ["plane", "ship"] and report.horizontal and report.skipped == []
    p, q = records
    assert (p.image_id, p.image_size, q.image_id, q.image_size) == ("p", (40, 50), "q", (20, 20))
    for ann, b in zip(anns, p.boxes.double()):
        x, y, w, h = ann["bbox"]
        assert box_polygon(b).symmetric_difference(box(x, y, x + w, y + h)).area < 1e-5 * w * h  # float32
    assert p.labels.tolist() == [1, 0] and p.difficult.tolist() == [False, True]  # crowd -> difficult
    assert len(q.labels) == 0


def test_coco_problems_name_the_json_path(tmp_path):
    anns = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 8]},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 2, "x", 4]},
        {"id": 3, "image_id": 99, "category_id": 3, "bbox": [1, 2, 3, 4]},
    ]
    path = write_coco(tmp_path, anns)
    (tmp_path / "val" / "q.jpg").unlink()
    records, _, report = read_coco(tmp_path, "val", on_error="skip")
    assert report.skipped == [
        f"{path}: images[1] (id 8): image file {tmp_path / 'val' / 'q.jpg'} not found",
        f"{path}: annotations[1] (id 2): bbox [1, 2, 'x', 4] must be 4 finite numbers [x, y, w, h]",
        f"{path}: annotations[2] (id 3): image_id 99 is not a readable image of this file",
    ]
    assert [len(r.labels) for r in records] == [1]
    with pytest.raises(DataError, match=r"images\[1\] \(id 8\): image file"):
        read_coco(tmp_path, "val")
    path.write_text('{"images": [\n  1,\n  }')
    with pytest.raises(DataError, match=rf"^{path}:3: JSON does not parse"):
        read_coco(tmp_path, "val", on_error="skip")


# ---------------------------------------------------------------- image conversion


def png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_rgba_and_16_bit_images_become_8_bit_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # a fully transparent pixel keeps its colour: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    gray16 = np.array([[0, 1000], [2000, 4000]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    Image.fromarray(gray16.astype(np.float32) / 8.0).save(tmp_path / "f32.tif")
    rgb16 = np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 3000
    png_rgb16(tmp_path / "rgb16.png", rgb16)

    out = {p.name: read_image(p) for p in tmp_path.iterdir()}
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in out.values())
    assert out["rgba.png"][:, 0, 0].tolist() == [200, 0, 0]
    expect = np.round(gray16 / 4000 * 255).astype(np.uint8)
    for name in ("g16.png", "g16.tif", "f32.tif"):
        assert all((out[name][c].numpy() == expect).all() for c in range(3)), name
    # 48-bit RGB keeps its channels; within 1 of the linear 16 -> 8 bit scale
    assert np.abs(out["rgb16.png"].permute(1, 2, 0).numpy().astype(int) - rgb16 / 257).max() <= 1


def test_a_16_bit_voc_image_loads(tmp_path):
    root = write_voc(tmp_path, ids=("a",))
    (root / "JPEGImages" / "a.png").unlink()
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(root / "JPEGImages" / "a.png")
    records, _, _ = read_voc(root, "train")
    sample = records[0].load()
    assert sample.image.shape == (3, 30, 40) and sample.image.dtype == torch.uint8 and int(sample.image.max()) == 255


# ---------------------------------------------------------------- scene folders


@needs(AID)
def test_aid_scene_folders():
    items, names, report = read_scenes(AID, "train")
    folders = sorted(p.name for p in (AID / "train").iterdir() if p.is_dir())
    assert names == folders and len(names) == 30 and report.skipped == []
    assert len(items) == report.images == 30 * 60
    assert np.bincount([label for _, label in items]).tolist() == [60] * 30
    assert all(path.parent.name == names[label] for path, label in items)
    val, _, report = read_scenes(AID, "val", ["Beach", "Airport"])  # a subset: the other folders are left out
    assert {label for _, label in val} == {0, 1} and len(val) == 40 and report.skipped == []
    with pytest.raises(DataError, match="no folder for the listed class 'Beech' in split 'val'"):
        read_scenes(AID, "val", ["Beech", "Airport"])
    assert all(path.parent.name == ["Beach", "Airport"][label] for path, label in val)


def test_scene_problems(tmp_path):
    (tmp_path / "train" / "Forest").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "Forest" / "1.jpg")
    (tmp_path / "train" / "Forest" / "notes.txt").write_text("x")
    (tmp_path / "train" / "stray.jpg").write_text("x")
    with pytest.raises(DataError, match="stray.jpg: a file next to the class folders"):
        read_scenes(tmp_path, "train")
    items, names, report = read_scenes(tmp_path, "train", on_error="skip")
    assert names == ["Forest"] and len(items) == 1 and len(report.skipped) == 2
    assert report.skipped[1] == f"{tmp_path / 'train' / 'Forest' / 'notes.txt'}: not an image file " + (
        "(.png, .jpg, .jpeg, .tif, .tiff, .bmp)"
    )
