"""DOTA as the devkit writes and scores it: quirks of real label files, and Task1 mAP against independent references.

References written here, not calling rkd's IoU: a shapely implementation of DOTA Task1
(``dota_evaluation_task1.py``: VOC all-point AP, IoU of the quadrilaterals as given,
difficult ignored, each detection judged against its best-overlapping ground truth), and
a scalar port of the devkit's ``polyiou`` (fan triangles from the origin clipped with
``polygon_cut``) for the non-convex and self-intersecting quadrilaterals shapely refuses.

One deliberate difference from the devkit: a zero-area ground-truth polygon (written by its
splitter at patch borders) is dropped with a warning; the devkit keeps it as an object no
detection can match (IoU 0), which lowers recall. The reference drops it too.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from PIL import Image

from rkd.cli import main
from rkd.data.dataset import build_dataset, skipped_lines, validate_data_spec, write_skipped
from rkd.data.dota import DOTA_CLASSES, read_dota
from rkd.data.inspect import available_splits, check_dataset
from rkd.data.voc import read_dior
from rkd.errors import DataError
from rkd.eval import evaluate_detections
from rkd.eval.cli import evaluate_files
from rkd.geometry import obb_to_poly, poly_to_obb, rotated_iou_aligned
from rkd.geometry.polygon_iou import is_convex, polygon_iou, polygon_iou_aligned

DATA = Path(__file__).parent / "data"
SIZES = {"P0001": (300, 300), "P0002": (200, 200), "P0003__1__0___0": (256, 256), "P0009": (200, 200)}
CLASSES = ["plane", "ship", "storage-tank", "large-vehicle"]


def with_images(src: Path, dst: Path, sizes: dict[str, tuple[int, int]] = SIZES) -> Path:
    """A copy of a fixture's ``labelTxt`` with generated images beside it (flat layout)."""
    shutil.copytree(src / "labelTxt", dst / "labelTxt")
    (dst / "images").mkdir()
    for label in (dst / "labelTxt").glob("*.txt"):
        h, w = sizes[label.stem]
        Image.new("RGB", (w, h), (90, 90, 90)).save(dst / "images" / f"{label.stem}.png")
    return dst


@pytest.fixture
def flat(tmp_path) -> Path:
    return with_images(DATA / "dota_flat", tmp_path / "flat")


# ---------------------------------------------------------------- independent references


def devkit_parse(label_dir: Path) -> dict[str, list[tuple[np.ndarray, str, int]]]:
    """``parse_gt`` of the devkit: lines of >= 9 fields, difficult = int(field 10) or 0; zero-area ones dropped."""
    out = {}
    for path in sorted(label_dir.glob("*.txt")):
        objects = []
        for line in path.read_bytes().decode("utf-8-sig").splitlines():
            f = line.split()
            if len(f) < 9:
                continue
            poly = np.array([float(v) for v in f[:8]])
            if shapely.Polygon(poly.reshape(4, 2)).area > 1e-6:
                objects.append((poly, f[8], int(f[9]) if len(f) == 10 else 0))
        out[path.stem] = objects
    return out


def shapely_iou(p: np.ndarray, q: np.ndarray) -> float:
    a, b = shapely.Polygon(p.reshape(4, 2)), shapely.Polygon(q.reshape(4, 2))
    assert a.is_valid and b.is_valid  # the reference is only trusted on simple polygons
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def dota_task1(gt, dets: dict[str, list[tuple[str, float, np.ndarray]]], thr: float, iou=shapely_iou) -> dict:
    """``voc_eval`` of ``dota_evaluation_task1.py`` per class, with shapely IoU; ``{class: AP}`` for classes with GT."""
    aps = {}
    for name in sorted({n for objs in gt.values() for _, n, _ in objs}):
        recs = {i: [(p, d) for p, n, d in objs if n == name] for i, objs in gt.items()}
        npos = sum(d == 0 for objs in recs.values() for _, d in objs)
        if npos == 0:
            continue
        taken = {i: [False] * len(r) for i, r in recs.items()}
        ranked = sorted(dets.get(name, []), key=lambda x: -x[1])
        tp, fp = np.zeros(len(ranked)), np.zeros(len(ranked))
        for k, (image, _, poly) in enumerate(ranked):
            overlaps = [iou(g, poly) for g, _ in recs[image]]
            ovmax = max(overlaps, default=-math.inf)
            if ovmax > thr:
                j = int(np.argmax(overlaps))
                if recs[image][j][1] == 0:
                    if not taken[image][j]:
                        tp[k], taken[image][j] = 1, True
                    else:
                        fp[k] = 1
            else:
                fp[k] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        aps[name] = voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps))
    return aps


def devkit_polyiou(p: np.ndarray, q: np.ndarray) -> float:
    """A line-by-line port of the devkit's ``polyiou.cpp`` (``iou_poly``), scalar Python floats."""

    def sig(d):
        return (d > 1e-8) - (d < -1e-8)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (b[0] - o[0]) * (a[1] - o[1])

    def area(ps):
        nxt = ps[1:] + ps[:1]
        return sum(p[0] * q[1] - p[1] * q[0] for p, q in zip(ps, nxt)) / 2

    def same(a, b):
        return sig(a[0] - b[0]) == 0 and sig(a[1] - b[1]) == 0

    def line_cross(a, b, c, d):
        s1, s2 = cross(a, b, c), cross(a, b, d)
        return ((c[0] * s2 - d[0] * s1) / (s2 - s1), (c[1] * s2 - d[1] * s1) / (s2 - s1))

    def polygon_cut(p, a, b):
        pp = []
        for i in range(len(p)):
            here, there = sig(cross(a, b, p[i])), sig(cross(a, b, p[(i + 1) % len(p)]))
            if here > 0:
                pp.append(p[i])
            if here != there:
                pp.append(line_cross(a, b, p[i], p[(i + 1) % len(p)]))
        out = [v for i, v in enumerate(pp) if i == 0 or not same(v, pp[i - 1])]
        while len(out) > 1 and same(out[-1], out[0]):
            out.pop()
        return out

    def triangle_inter(a, b, c, d):
        o = (0.0, 0.0)
        s1, s2 = sig(cross(o, a, b)), sig(cross(o, c, d))
        if s1 == 0 or s2 == 0:
            return 0.0
        if s1 == -1:
            a, b = b, a
        if s2 == -1:
            c, d = d, c
        poly = [o, a, b]
        for u, v in ((o, c), (c, d), (d, o)):
            poly = polygon_cut(poly, u, v)
        res = abs(area(poly)) if len(poly) > 2 else 0.0
        return -res if s1 * s2 == -1 else res

    ps1 = [tuple(v) for v in p.reshape(4, 2).tolist()]
    ps2 = [tuple(v) for v in q.reshape(4, 2).tolist()]
    ps1 = ps1[::-1] if area(ps1) < 0 else ps1
    ps2 = ps2[::-1] if area(ps2) < 0 else ps2
    inter = sum(triangle_inter(ps1[i], ps1[(i + 1) % 4], ps2[j], ps2[(j + 1) % 4]) for i in range(4) for j in range(4))
    union = abs(area(ps1)) + abs(area(ps2)) - inter
    return inter / union if union > 1e-9 else math.nan


# ---------------------------------------------------------------- polygon IoU


def random_quads(rng: np.random.Generator, n: int, jitter: float) -> np.ndarray:
    """Rotated rectangles with each corner moved by up to ``jitter`` of the short side: non-rectangular quads."""
    c = rng.uniform(20, 80, (n, 1, 2))
    w, h, a = rng.uniform(8, 40, n), rng.uniform(8, 40, n), rng.uniform(-math.pi, math.pi, n)
    u = np.stack([np.cos(a), np.sin(a)], -1)[:, None] * (w / 2)[:, None, None]
    v = np.stack([-np.sin(a), np.cos(a)], -1)[:, None] * (h / 2)[:, None, None]
    sx, sy = np.array([1, -1, -1, 1])[None, :, None], np.array([1, 1, -1, -1])[None, :, None]
    corners = c + sx * u + sy * v
    corners += rng.uniform(-1, 1, (n, 4, 2)) * jitter * np.minimum(w, h)[:, None, None]
    return corners.reshape(n, 8)


def test_polygon_iou_of_quadrilaterals_as_given_equals_shapely():
    rng = np.random.default_rng(0)
    a, b = random_quads(rng, 3000, 0.2), random_quads(rng, 3000, 0.2)
    b[::2] = a[::2] + rng.normal(0, 3, (1500, 8))  # many overlapping pairs
    b[1::5, 1::2] = -b[1::5, 1::2] + 100  # and some given clockwise (y flipped)
    a[::7] = np.stack([dart(q) for q in a[::7]])  # and concave ones
    pa, pb = shapely.polygons(a.reshape(-1, 4, 2)), shapely.polygons(b.reshape(-1, 4, 2))
    ok = shapely.is_valid(pa) & shapely.is_valid(pb)
    inter = shapely.area(shapely.intersection(pa[ok], pb[ok]))
    expected = inter / (shapely.area(pa[ok]) + shapely.area(pb[ok]) - inter)
    got = polygon_iou_aligned(torch.from_numpy(a[ok]), torch.from_numpy(b[ok])).numpy()
    assert ok.sum() > 2500 and (expected > 0.3).sum() > 500
    assert (~is_convex(torch.from_numpy(a[ok]))).sum() > 20  # concave ones took the general path
    np.testing.assert_allclose(got, expected, atol=1e-9)
    # the matrix form, and that the IoU is not the one of the minimum-area rectangles
    full = polygon_iou(torch.from_numpy(a[:40]), torch.from_numpy(b[:40])).numpy()
    np.testing.assert_allclose(np.diag(full), polygon_iou_aligned(torch.from_numpy(a[:40]), torch.from_numpy(b[:40])))
    rect = rotated_iou_aligned(poly_to_obb(torch.from_numpy(a[ok])), poly_to_obb(torch.from_numpy(b[ok]))).numpy()
    assert np.abs(rect - expected).max() > 0.05


def test_polygons_sharing_edges_or_touching_equal_shapely():
    """Edges on a common line are on both boundaries: counted once when the polygons overlap along them,
    not at all when they only touch; identical polygons, in either orientation, have IoU exactly 1."""
    square = [0.0, 0, 2, 0, 2, 2, 0, 2]
    others = [
        square,
        [0.0, 2, 2, 2, 2, 0, 0, 0],
        [2.0, 2, 0, 2, 0, 0, 2, 0],  # the same square: clockwise, rolled
        [0.0, 1, 2, 1, 2, 3, 0, 3],
        [1.0, 0, 3, 0, 3, 2, 1, 2],
        [1.0, 0, 2, 0, 2, 1, 1, 1],  # shared edge parts
        [2.0, 0, 4, 0, 4, 2, 2, 2],
        [2.0, 2, 3, 2, 3, 3, 2, 3],
        [2.0, -1, 3, -1, 3, 3, 2, 3],  # touching outside
        [0.5, 0.5, 1.5, 0.5, 1.5, 1.5, 0.5, 1.5],
        [1.0, -1, 3, 1, 1, 3, -1, 1],  # inside; a diamond around
    ]
    a = np.array([square] * len(others))
    b = np.array(others)
    pa, pb = shapely.polygons(a.reshape(-1, 4, 2)), shapely.polygons(b.reshape(-1, 4, 2))
    inter = shapely.area(shapely.intersection(pa, pb))
    expected = inter / (shapely.area(pa) + shapely.area(pb) - inter)
    for x, y in ((a, b), (b, a)):  # either side first: the shared-edge rule is not symmetric in the code
        got = polygon_iou_aligned(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-12)
    assert expected[:3].tolist() == [1.0, 1.0, 1.0] and expected[6:9].tolist() == [0.0, 0.0, 0.0]


def test_non_convex_and_self_intersecting_quadrilaterals_match_the_devkit():
    """Random 4 points: about a third cross themselves (shapely calls them invalid); the devkit still gives a value."""
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 60, (400, 8))
    b = a + rng.normal(0, 8, (400, 8))
    b[::3] = rng.uniform(0, 60, (134, 8))
    crossing = ~shapely.is_valid(shapely.polygons(a.reshape(-1, 4, 2)))
    assert crossing.sum() > 80
    expected = np.array([devkit_polyiou(p, q) for p, q in zip(a, b)])
    got = polygon_iou_aligned(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ok = np.isfinite(expected)  # the devkit divides by zero where the union is 0; rkd gives 0 there
    assert ok.sum() > 390
    np.testing.assert_allclose(got[ok], expected[ok], atol=1e-9)
    # A bow-tie's lobes count with opposite signs: (0,0),(4,2),(4,0),(0,2) crosses itself at (2, 1); its left
    # lobe (area 2) winds +1, its right lobe (area 2) -1, so its signed area is 0. The square (0,0)-(2,2)
    # holds the left lobe: the devkit's intersection is 2, its union |0| + 4 - 2 = 2, its IoU 1.
    bowtie = np.array([0.0, 0, 4, 2, 4, 0, 0, 2])
    square = np.array([0.0, 0, 2, 0, 2, 2, 0, 2])
    assert devkit_polyiou(bowtie, square) == pytest.approx(1.0)
    got = polygon_iou_aligned(torch.tensor(bowtie[None]), torch.tensor(square[None])).item()
    assert got == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- label files


def test_splitter_difficulty_2_degenerate_polygons_and_bom(flat):
    records, names, report = read_dota(flat, None)  # on_error="raise": none of these is an error
    by_id = {r.image_id: r for r in records}
    patch = by_id["P0003__1__0___0"]
    assert names == ["harbor", "large-vehicle", "plane", "ship", "small-vehicle", "storage-tank"]
    assert [names[i] for i in patch.labels] == ["large-vehicle", "large-vehicle", "harbor"]
    assert patch.difficulty.tolist() == [2, 0, 0] and patch.difficult.tolist() == [True, False, False]
    np.testing.assert_array_equal(patch.polygons[2].numpy(), [140, 20, 200, 20, 200, 50, 140, 50])
    where = flat / "labelTxt" / "P0003__1__0___0.txt"
    assert report.skipped == [f"{where}:3: polygon has zero area (corners on a line); line dropped"]
    assert len(by_id["P0002"].labels) == 2  # UTF-8 BOM and CRLF line ends
    assert by_id["P0001"].difficult.tolist() == [False, False, False, True, False]
    assert report.objects == 2 + 5 + 3


def test_a_label_file_in_another_encoding_names_file_and_line(tmp_path):
    root = with_images(DATA / "dota_latin1", tmp_path / "latin1")
    where = root / "labelTxt" / "P0009.txt"
    with pytest.raises(DataError) as err:
        read_dota(root, None)
    assert str(err.value) == f"{where}:3: not UTF-8 text (byte 0xe9 at column 44); save the file as UTF-8"
    records, names, report = read_dota(root, None, on_error="skip")
    assert names == ["ship"] and len(records[0].labels) == 1 and report.skipped == [str(err.value)]
    utf16 = tmp_path / "utf16"
    with_images(DATA / "dota_latin1", utf16)
    (utf16 / "labelTxt" / "P0009.txt").write_bytes(codecs.BOM_UTF16_LE + "gsd:0.5\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"P0009.txt:1: file is UTF-16 text; label files must be UTF-8"):
        read_dota(utf16, None)


def test_flat_layout_is_a_dataset_of_its_own(flat, tmp_path, capsys):
    assert available_splits(flat, "dota") == ["all"]
    assert [r.image_id for r in read_dota(flat, "all")[0]] == [r.image_id for r in read_dota(flat, None)[0]]
    with pytest.raises(DataError, match=r"no DOTA split 'val': this folder is one unsplit set .*leave the split out"):
        read_dota(flat, "val")
    # data stats: what could be read, and the problem count
    assert main(["data", "stats", str(flat), "--format", "dota"]) == 0
    out = capsys.readouterr().out
    assert f"{flat} split all (dota): 3 images (0 without objects), 10 objects (2 difficult), 6 classes" in out
    assert "  1 problem(s): lines or files left out (rkd data check lists them)" in out
    # data check lists the dropped line and exits 1
    assert main(["data", "check", str(flat), "--format", "dota"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("P0003__1__0___0.txt:3: polygon has zero area (corners on a line); line dropped")
    assert out[-1] == f"1 problem(s) in {flat}"
    assert check_dataset(flat, "dota", ["all"]) == [out[0]]


def test_known_class_lists_by_name(flat):
    assert len(DOTA_CLASSES["dota-v1.0"]) == 15 and DOTA_CLASSES["dota-v2.0"][-2:] == ("airport", "helipad")
    assert DOTA_CLASSES["dota-v1.5"] == (*DOTA_CLASSES["dota-v1.0"], "container-crane")
    _, names, _ = read_dota(flat, None, "dota-v1.0")
    assert names == list(DOTA_CLASSES["dota-v1.0"])
    spec = validate_data_spec({"format": "dota", "root": str(flat), "classes": "dota-v1.5"})
    assert spec["classes"] == list(DOTA_CLASSES["dota-v1.5"]) and spec["num_classes"] == 16
    with pytest.raises(Exception, match=r"classes: unknown class list 'dota-v3'"):
        validate_data_spec({"format": "dota", "root": str(flat), "classes": "dota-v3"})


def test_skipped_lines_are_logged_and_written(tmp_path, caplog):
    root = with_images(DATA / "dota_latin1", tmp_path / "latin1")
    spec = validate_data_spec(
        {"format": "dota", "root": str(root), "train_split": "all", "val_split": "all", "on_error": "skip"}
    )
    with caplog.at_level(logging.WARNING, logger="rkd.data.dataset"):
        dataset = build_dataset(spec, "train", train=False)
    line = f"{root / 'labelTxt' / 'P0009.txt'}:3: not UTF-8 text (byte 0xe9 at column 44); save the file as UTF-8"
    assert dataset.report.skipped == [line]
    assert f"split 'train': 1 label line(s) skipped:\n  {line}" in caplog.text
    assert skipped_lines(spec) == [line]
    path = write_skipped(skipped_lines(spec), tmp_path)
    assert path.read_text() == line + "\n"


# ---------------------------------------------------------------- Task1 mAP against the shapely reference


def dart(quad: np.ndarray) -> np.ndarray:
    """A concave (arrow-head) quadrilateral: the third corner pulled past the centre's diagonal."""
    p = quad.reshape(4, 2).copy()
    p[2] = p[0] + 0.35 * (p[2] - p[0])
    return p.reshape(8)


def jittered(rng: np.random.Generator, quad: np.ndarray, sigma: float) -> np.ndarray:
    """``quad`` with its corners moved by N(0, sigma) px, kept simple so shapely can take it."""
    while True:
        out = quad + rng.normal(0, sigma, 8)
        if shapely.Polygon(out.reshape(4, 2)).is_valid:
            return out


def write_dataset(rng: np.random.Generator, root: Path, num_images: int) -> dict[str, list]:
    """Random DOTA labels (non-rectangular, concave, difficult 0/1/2, degenerate lines) and Task1 detections."""
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    dets: dict[str, list] = {}
    for i in range(num_images):
        image = f"P{i:04d}"
        Image.new("RGB", (128, 128)).save(root / "images" / f"{image}.png")
        n = int(rng.integers(3, 9))
        quads = random_quads(rng, n, 0.15)
        lines = ["imagesource:GoogleEarth", "gsd:0.146343590398"]
        for _k, quad in enumerate(quads):
            if rng.uniform() < 0.2:
                quad = dart(quad)
            name = CLASSES[int(rng.integers(len(CLASSES)))]
            level = int(rng.choice([0, 0, 0, 0, 1, 2]))
            lines.append(" ".join(f"{v:.1f}" for v in quad) + f" {name} {level}")
            if rng.uniform() < 0.85:  # a detection: the corners jittered
                seen = rng.uniform() < 0.9
                label = name if seen else CLASSES[int(rng.integers(len(CLASSES)))]
                dets.setdefault(label, []).append((image, float(rng.uniform(0.2, 1.0)), jittered(rng, quad, 1.2)))
                if rng.uniform() < 0.3:  # a second, weaker detection of the same object
                    dets[label].append((image, float(rng.uniform(0.0, 0.6)), jittered(rng, quad, 2.0)))
        if rng.uniform() < 0.3:  # the splitter's border lines: a zero-area polygon
            y = float(rng.integers(10, 100))
            lines.append(f"1.0 {y} 1.0 {y} 1.0 {y + 30} 1.0 {y + 30} {CLASSES[0]} {int(rng.integers(0, 3))}")
        for _ in range(int(rng.integers(0, 4))):  # false positives
            dets.setdefault(CLASSES[int(rng.integers(len(CLASSES)))], []).append(
                (image, float(rng.uniform(0, 0.8)), random_quads(rng, 1, 0.15)[0])
            )
        (root / "labelTxt" / f"{image}.txt").write_text("\n".join(lines) + "\n")
    return dets


def write_task1(dets: dict[str, list], folder: Path, classes: list[str] = CLASSES) -> None:
    folder.mkdir()
    for name in classes:
        rows = [
            f"{image} {score!r} " + " ".join(repr(float(v)) for v in poly) for image, score, poly in dets.get(name, [])
        ]
        (folder / f"Task1_{name}.txt").write_text("".join(r + "\n" for r in rows))


def test_task1_map_equals_the_shapely_devkit_reference(tmp_path, capsys):
    rng = np.random.default_rng(7)
    root = tmp_path / "dota"
    dets = write_dataset(rng, root, 40)
    # The reference reads the files as written (rounded like the Task1 text, repr round-trips)
    write_task1(dets, tmp_path / "task1")
    gt = devkit_parse(root / "labelTxt")
    assert any(
        not shapely.Polygon(p.reshape(4, 2)).convex_hull.equals(shapely.Polygon(p.reshape(4, 2)))
        for objs in gt.values()
        for p, _, _ in objs
    )  # concave ground truth is in there
    code = main(["evaluate", "--gt", str(root), "--gt-format", "dota", "--pred", str(tmp_path / "task1"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["protocol"]["iou"] == "polygon" and result["protocol"]["ap"] == "all-point"
    assert result["protocol"]["split"] == "all" and result["protocol"]["skipped_lines"] > 3
    assert captured.err.count("polygon has zero area") == result["protocol"]["skipped_lines"]
    for thr, key in ((0.5, "mAP50"), (0.75, "mAP75")):
        ref = dota_task1(gt, dets, thr)
        assert result[key] == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
        for name, ap in ref.items():
            assert result["per_class"][name][key.replace("mAP", "ap")] == pytest.approx(ap, abs=1e-6)
    # The same data through the minimum-area rectangles gives a visibly different number (what rkd used to do).
    assert abs(np.mean(list(dota_task1(gt, dets, 0.5, rectangle_iou).values())) - result["mAP50"]) > 1e-3


def rectangle_iou(g: np.ndarray, p: np.ndarray) -> float:
    """IoU of the two polygons' minimum-area rectangles: not DOTA's protocol."""
    return float(rotated_iou_aligned(poly_to_obb(torch.tensor(g[None])), poly_to_obb(torch.tensor(p[None])))[0])


def test_voc_matching_judges_each_detection_by_its_best_ground_truth():
    """Two ground truths; the second detection overlaps the taken one most: a false positive (greedy: a hit)."""
    square = lambda x: [x, 0.0, x + 10, 0, x + 10, 10, x, 10]  # noqa: E731
    gt = [
        {
            "boxes": torch.tensor([square(0), square(4)]),
            "labels": torch.tensor([0, 0]),
            "difficult": torch.tensor([False, False]),
        }
    ]
    det = [
        {
            "boxes": torch.tensor([square(0), square(1)]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 0]),
        }
    ]
    # det 2 vs gt 1: IoU 90/110 = 0.818 (taken), vs gt 2: IoU 70/130 = 0.538
    voc = evaluate_detections(det, gt, 1, matching="voc")
    greedy = evaluate_detections(det, gt, 1)
    assert voc.map == pytest.approx(0.5) and greedy.map == pytest.approx(1.0)
    assert voc.iou == "polygon" and voc.matching == "voc"
    # A best ground truth that is difficult makes the detection ignored, even with another one above the
    # threshold: both detections' best is the difficult gt 1, so gt 2 is never found.
    gt[0]["difficult"] = torch.tensor([True, False])
    assert evaluate_detections(det, gt, 1, matching="voc").map == 0.0
    assert evaluate_detections(det, gt, 1).map == 1.0
    # strict threshold, as the devkit: an IoU of exactly 0.5 is not a match
    whole = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    half = [{"boxes": torch.tensor([[0.0, 0, 10, 5]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    assert evaluate_detections(half, whole, 1, oriented=False, matching="voc").map == 0.0
    assert evaluate_detections(half, whole, 1, oriented=False).map == 1.0


def test_patch_polygons_are_shifted_into_their_scene(flat, tmp_path):
    """Task1 lines on patches of a scene: merged into the scene with their polygons, which the IoU uses."""
    records, names, _ = read_dota(flat, None)
    scene = next(r for r in records if r.image_id == "P0001")
    lines = {n: [] for n in names}
    for poly, label in zip(scene.polygons.numpy(), scene.labels.tolist()):
        moved = poly.copy()
        moved[0::2] -= 100  # seen by the patch whose window starts at x = 100 (parts outside are fine)
        lines[names[label]].append("P0001__1__100___0 0.9 " + " ".join(repr(float(v)) for v in moved))
    (tmp_path / "task1").mkdir()
    for name, rows in lines.items():
        (tmp_path / "task1" / f"Task1_{name}.txt").write_text("".join(r + "\n" for r in rows))
    result = evaluate_files(flat, "dota", tmp_path / "task1")
    # every object of P0001 found (the ship is concave); P0002's plane and ship are not
    assert result["per_class"]["storage-tank"]["ap75"] == 1.0 and result["per_class"]["plane"]["ap75"] == 2 / 3
    assert result["per_class"]["ship"]["ap75"] == 0.5


def test_data_tile_cuts_a_flat_folder_without_split(flat, tmp_path, capsys):
    out = tmp_path / "tiles"
    assert (
        main(["data", "tile", str(flat), "--format", "dota", "--out", str(out), "--size", "256", "--overlap", "0"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("all: 3 images -> ")
    assert sorted(p.name for p in out.iterdir()) == ["all", "classes.txt"]
    assert len(list((out / "all" / "labelTxt").glob("*.txt"))) == len(list((out / "all" / "images").glob("*.png")))


def test_a_search_lists_the_skipped_lines_in_its_run_folder_and_counts_them(tmp_path):
    from types import SimpleNamespace

    from rkd.search.summary import count_skipped_lines, record_skipped_lines

    root = with_images(DATA / "dota_latin1", tmp_path / "latin1")
    data = validate_data_spec(
        {"format": "dota", "root": str(root), "train_split": "all", "val_split": "all", "on_error": "skip"}
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logged: list[str] = []
    from rkd.train.tasks import TASKS

    files, found = TASKS["detection"].check_data(data)  # what the search's input check reads, once
    assert found == skipped_lines(data) and len(found) == 1 and files
    lines = record_skipped_lines(SimpleNamespace(run_dir=run_dir), found, logged.append)
    assert lines == found
    assert (run_dir / "skipped_lines.txt").read_text() == lines[0] + "\n"
    assert count_skipped_lines(run_dir) == 1
    assert logged == [
        f"[data] 1 label line(s) skipped (data.on_error: skip); listed in {run_dir / 'skipped_lines.txt'}"
    ]
    # the data mended: the list of the earlier run goes, the count is 0
    clean = validate_data_spec(
        {"format": "synthetic", "num_classes": 2, "num_train": 2, "num_val": 1, "input_size": 64}
    )
    record_skipped_lines(SimpleNamespace(run_dir=run_dir), TASKS["detection"].check_data(clean)[1], logged.append)
    assert count_skipped_lines(run_dir) == 0 and not (run_dir / "skipped_lines.txt").exists()


# ---------------------------------------------------------------- DIOR-R: the robndbox corners as written

DIOR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fixtures" / "dior"
DIOR_CORNERS = ("left_top", "right_top", "right_bottom", "left_bottom")  # the order rkd's polygons keep


def dior_objects(xml: Path) -> list[tuple[np.ndarray, str, int]]:
    """``(corners (8,), name, difficult)`` of every ``<object>``, read with xml.etree (not rkd's parser)."""
    out = []
    for obj in ET.parse(xml).getroot().findall("object"):
        corners = [float(obj.find(f"robndbox/{axis}_{corner}").text) for corner in DIOR_CORNERS for axis in "xy"]
        out.append((np.array(corners), obj.find("name").text.strip(), int(obj.findtext("difficult", "0"))))
    return out


def usable(objects: list[tuple[np.ndarray, str, int]]) -> list[tuple[np.ndarray, str, int]]:
    """The objects a devkit-style reference keeps: zero-area polygons dropped (see module doc)."""
    return [o for o in objects if shapely.Polygon(o[0].reshape(4, 2)).area > 1e-6]


def assert_records_keep_the_corners(records, names, gt: dict[str, list[tuple[np.ndarray, str, int]]]) -> None:
    """Row i of polygons, labels, difficulty and boxes is the i-th usable object of the XML, in file order;
    the boxes (what training sees) are the corners' minimum-area rectangles, as before polygons were kept."""
    assert [r.image_id for r in records] == sorted(gt)
    for record in records:
        objects = gt[record.image_id]
        corners = np.stack([p for p, _, _ in objects]).reshape(-1, 8) if objects else np.zeros((0, 8))
        assert record.polygons.dtype == torch.float64 and record.difficulty.dtype == torch.long
        np.testing.assert_array_equal(record.polygons.numpy(), corners)
        assert [names[i] for i in record.labels.tolist()] == [n for _, n, _ in objects]
        assert record.difficulty.tolist() == [d for *_, d in objects]
        assert record.difficult.tolist() == [d == 1 for *_, d in objects]
        assert record.boxes.dtype == torch.float32
        assert torch.equal(record.boxes, poly_to_obb(torch.from_numpy(corners)).float())


def evaluate_json(capsys, root: Path, task1: Path, *args: str) -> dict:
    code = main(["evaluate", "--gt", str(root), "--gt-format", "dior", "--pred", str(task1), *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def assert_matches_reference(result: dict, gt, dets) -> None:
    """mAP50 / mAP75 and per-class APs equal the shapely VOC all-point reference (difficult ignored)."""
    assert result["protocol"]["iou"] == "polygon" and result["protocol"]["ap"] == "all-point"
    for thr, key in ((0.5, "mAP50"), (0.75, "mAP75")):
        ref = dota_task1(gt, dets, thr)
        assert result[key] == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
        for name, ap in ref.items():
            assert result["per_class"][name][key.replace("mAP", "ap")] == pytest.approx(ap, abs=1e-6)


@pytest.mark.skipif(not DIOR.is_dir(), reason=f"{DIOR} not present")
def test_dior_fixture_map_is_taken_on_the_robndbox_corners(tmp_path, capsys):
    gt = {"00001": dior_objects(DIOR / "Annotations" / "Oriented Bounding Boxes" / "00001.xml")}
    records, names, report = read_dior(DIOR, "demo")
    assert names == ["golffield"] and report.skipped == []
    assert_records_keep_the_corners(records, names, gt)
    ((corners, name, _),) = gt["00001"]
    quad = corners.reshape(4, 2)
    middle = quad.mean(0)
    rng = np.random.default_rng(11)
    dets = {
        name: [
            ("00001", 0.95, np.array([20.0, 20, 110, 30, 100, 150, 10, 140])),  # nothing there: a false positive
            ("00001", 0.9, dart(corners)),  # concave: IoU 0.35
            ("00001", 0.8, (middle + 1.25 * (quad - middle)).reshape(8)),  # 25% too large all round: IoU 0.64
            ("00001", 0.7, jittered(rng, corners, 12.0)),  # corners moved: not a rectangle any more
            ("00001", 0.6, (quad + [[30.0, 0], [0, 0], [-40, 25], [0, 0]]).reshape(8)),  # a skewed trapezoid
        ]
    }
    assert not is_convex(torch.from_numpy(dets[name][1][2][None]))[0]
    write_task1(dets, tmp_path / "task1", names)
    result = evaluate_json(capsys, DIOR, tmp_path / "task1", "--split", "demo")
    assert_matches_reference(result, gt, dets)
    assert result["per_class"]["golffield"]["num_gt"] == 1 and result["protocol"]["split"] == "demo"
    assert 0 < result["mAP75"] < result["mAP50"] < 1  # the false positive and the loose quads count


def dior_from_dota(dota: Path, dior: Path, size: int = 128) -> None:
    """The labels of a DOTA folder as DIOR-R XML without images (difficult 2, the DOTA splitter's, becomes 1)."""
    (dior / "Annotations").mkdir(parents=True)
    for label in sorted((dota / "labelTxt").glob("*.txt")):
        objects = []
        for fields in (line.split() for line in label.read_text().splitlines()):
            if len(fields) != 10:  # imagesource: / gsd: headers
                continue
            tags = [f"{axis}_{corner}" for corner in DIOR_CORNERS for axis in "xy"]
            box = "".join(f"<{t}>{v}</{t}>" for t, v in zip(tags, fields[:8]))
            objects.append(
                f"<object><name>{fields[8]}</name><difficult>{min(int(fields[9]), 1)}</difficult>"
                f"<robndbox>{box}</robndbox><angle>0</angle></object>"
            )
        text = f"<annotation><size><width>{size}</width><height>{size}</height></size>{''.join(objects)}</annotation>"
        (dior / "Annotations" / f"{label.stem}.xml").write_text(text)


def test_dior_map_on_quadrilateral_labels_equals_the_shapely_reference(tmp_path, capsys):
    """Non-rectangular and concave labels, difficult ones and zero-area ones: polygons as written, not rectangles."""
    rng = np.random.default_rng(5)
    dets = write_dataset(rng, tmp_path / "dota", 30)
    dior_from_dota(tmp_path / "dota", tmp_path / "dior")
    gt = {p.stem: usable(dior_objects(p)) for p in sorted((tmp_path / "dior" / "Annotations").glob("*.xml"))}
    records, names, report = read_dior(tmp_path / "dior", "all")
    assert names == sorted(CLASSES) and len(report.skipped) > 3  # the zero-area objects, dropped from every field
    assert_records_keep_the_corners(records, names, gt)
    assert any(d == 1 for objs in gt.values() for *_, d in objs)
    write_task1(dets, tmp_path / "task1")
    result = evaluate_json(capsys, tmp_path / "dior", tmp_path / "task1")
    assert_matches_reference(result, gt, dets)
    assert result["protocol"]["skipped_lines"] == len(report.skipped)
    # Labels replaced by their minimum-area rectangles (what rkd compared before) give another number.
    fitted = {
        image: [(obb_to_poly(poly_to_obb(torch.from_numpy(p[None])))[0].numpy(), n, d) for p, n, d in objs]
        for image, objs in gt.items()
    }
    assert abs(np.mean(list(dota_task1(fitted, dets, 0.5).values())) - result["mAP50"]) > 1e-3
