"""``rkd data stats`` and ``rkd data check``: numbers against counts made here, exit codes."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rkd.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NEPU = SHARED / "nepu_owod"
FIXTURES = SHARED / "fixtures"
AID = SHARED / "aid150"

SIZE_EDGES = [0, 8, 16, 32, 64, 128, 256, 512, math.inf]
ASPECT_EDGES = [1, 1.5, 2, 3, 4, 6, 10, math.inf]


def needs(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"{path} not present")


def bin_counts(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[next(i for i in range(len(edges) - 1) if edges[i] <= v < edges[i + 1])] += 1
    return counts


def printed_bins(text: str, heading: str, n: int) -> list[int]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(heading))
    return [int(line.split()[-1]) for line in lines[start + 1 : start + 1 + n]]


@needs(NEPU)
def test_stats_numbers_match_the_xml(capsys, tmp_path):
    ids = (NEPU / "ImageSets" / "Main" / "train.txt").read_text().split()
    sizes, aspects, difficult = [], [], 0
    for image_id in ids:
        for obj in ET.parse(NEPU / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
            x1, y1, x2, y2 = (float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            sizes.append(math.sqrt((x2 - x1) * (y2 - y1)))
            aspects.append(max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1))
            difficult += obj.find("difficult").text == "1"
    plot = tmp_path / "out" / "stats.png"
    assert main(["data", "stats", str(NEPU), "--format", "voc", "--split", "train", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert f"{len(ids)} images (0 without objects), {len(sizes)} objects ({difficult} difficult), 1 classes" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("oilwell")).split()
    assert row[1:4] == [str(len(sizes)), str(difficult), str(len(ids))]
    assert float(row[4]) == pytest.approx(
        sorted(sizes)[len(sizes) // 2]
        if len(sizes) % 2
        else sum(sorted(sizes)[len(sizes) // 2 - 1 : len(sizes) // 2 + 1]) / 2,
        abs=0.05,
    )
    assert printed_bins(out, "box size", 8) == bin_counts(sizes, SIZE_EDGES)
    assert printed_bins(out, "aspect ratio", 7) == bin_counts(aspects, ASPECT_EDGES)
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > im.height > 100


@needs(NEPU)
def test_stats_without_split_reports_every_split(capsys):
    assert main(["data", "stats", str(NEPU), "--format", "voc"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"split (\w+) \(voc\): (\d+) images", out) == [("train", "80"), ("val", "30")]


@needs(AID)
def test_stats_of_scene_folders(capsys):
    assert main(["data", "stats", str(AID), "--format", "scenes", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "600 images, 30 classes" in out
    folders = sorted(p.name for p in (AID / "val").iterdir())
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows == [[name, "20"] for name in folders]


def write_voc(root: Path) -> None:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for image_id in ("a", "b"):
        (root / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation>\n<object>\n<name>well</name>\n"
            "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>5</ymax></bndbox>\n</object>\n</annotation>\n"
        )
        noise = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "JPEGImages" / f"{image_id}.png")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\n")


def test_check_exit_codes(tmp_path, capsys):
    write_voc(tmp_path)
    assert main(["data", "check", str(tmp_path), "--format", "voc"]) == 0
    assert "no problems found" in capsys.readouterr().out

    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<ymax>5</ymax>", "<ymax>five</ymax>"))
    image = tmp_path / "JPEGImages" / "b.png"
    image.write_bytes(image.read_bytes()[:300])  # the header still parses; the pixels do not
    assert main(["data", "check", str(tmp_path), "--format", "voc"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{xml}:4: object 1 <ymax> 'five' is not a number"
    assert lines[1].startswith(f"{image}: cannot read image:")
    assert lines[2:] == [f"2 problem(s) in {tmp_path}"]  # b is in train and val: reported once


def test_check_of_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope"), "--format", "voc"]) == 2
    assert f"{tmp_path / 'nope'}: dataset folder not found" in capsys.readouterr().err


@needs(FIXTURES)
def test_check_of_the_fixtures(capsys):
    assert main(["data", "check", str(FIXTURES / "dior"), "--format", "dior"]) == 0
    # HRSC ships here without its image: labels only, which check reports
    assert main(["data", "check", str(FIXTURES / "hrsc"), "--format", "hrsc", "--split", "demo"]) == 1
    out = capsys.readouterr().out
    assert f"{FIXTURES / 'hrsc'}: image 100000006: no image file (no image folder: labels only)" in out


def test_data_tile_is_registered_when_tiling_exists(capsys):
    pytest.importorskip("rkd.data.tiling")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "tile", "--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out
