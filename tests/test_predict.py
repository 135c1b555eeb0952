"""`rkd predict`: an exported student on real UCAS-AOD images, DOTA output, tiling of large scenes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rkd.data.images import read_image
from rkd.data.sample import Sample
from rkd.data.transforms import letterbox
from rkd.deploy.export import export_student, load_exported
from rkd.deploy.predict import detect_tiled, dota_lines, load_detector, model_detector, normalize, window_starts
from rkd.errors import RkdError

from rkd.train.checkpoint import atomic_torch_save, read_checkpoint

from test_export import CLASSES, make_run, rkd_main, rows_of

UCAS_VAL = Path("/work/shared/data/ucas50/images/val")


def export_t_small(root: Path, state_dict: dict | None, formats: list[str]) -> Path:
    """A run's t_small student with ``state_dict`` (or its own, class logits sharpened), exported."""
    run = make_run(root)
    student = Path(next(r for r in rows_of(run) if r["trial_id"] == "t_small")["checkpoint"])
    ckpt = read_checkpoint(student)
    if state_dict is None:
        # Random heads score every location ~0.01; sharper class logits make the detections depend on the image.
        ckpt["state_dict"]["head.cls_out.weight"] *= 1000
        ckpt["state_dict"]["head.cls_out.bias"].zero_()
    else:
        ckpt["state_dict"] = state_dict
    atomic_torch_save(ckpt, student)
    return export_student(run, root / "model", pick="t_small", formats=formats, latency_runs=1).out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_t_small(tmp_path_factory.mktemp("predict"), None, ["safetensors"])


@pytest.fixture(scope="module")
def exported_trained(tmp_path_factory) -> Path:
    """t_small as a RetinaNet OBB trained briefly on UCAS-AOD (distinct scores, no ties), with its ONNX."""
    from test_export_e2e import trained, ucas_batches

    state = trained("retinanet", "obb", ucas_batches()).state_dict()  # the same architecture as t_small
    return export_t_small(tmp_path_factory.mktemp("predict_trained"), state, ["safetensors", "onnx"])


# --- a detector whose output is known: it finds each uniquely coloured rectangle it sees --------------


def colour_scene(height: int, width: int, objects: list[tuple[int, int, int, int]], seed: int = 0) -> torch.Tensor:
    """Noise in channels 0-1 below 200 and blue 0; object ``i`` is the colour (200 + i, 255, 255)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 200, (3, height, width), generator=g, dtype=torch.uint8)
    image[2] = 0
    for i, (x0, y0, w, h) in enumerate(objects):
        image[:, y0 : y0 + h, x0 : x0 + w] = torch.tensor([200 + i, 255, 255], dtype=torch.uint8).view(3, 1, 1)
    return image


def colour_detector(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Box of the visible pixels of each object colour; an object cut by the window edge scores lower."""
    boxes, scores, labels = [], [], []
    marked = image[2] == 255
    for value in image[0][marked].unique().tolist():
        ys, xs = torch.nonzero(marked & (image[0] == value), as_tuple=True)
        x0, x1, y0, y1 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
        w, h = x1 - x0, y1 - y0
        # le90: w >= h; a tall box is the wide one turned by -90 degrees
        box = [(x0 + x1) / 2, (y0 + y1) / 2, w, h, 0.0] if w >= h else [(x0 + x1) / 2, (y0 + y1) / 2, h, w, -math.pi / 2]
        boxes.append(box)
        scores.append(0.5 + 0.4 * min(1.0, len(xs) / 2000))
        labels.append((value - 200) % 2)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def as_set(det: dict[str, torch.Tensor]) -> set[tuple]:
    return {
        (tuple(round(v, 3) for v in b), round(s, 4), lab)
        for b, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
    }


def test_window_starts_cover_the_image():
    for length, tile, overlap in [(1372, 512, 128), (941, 512, 200), (512, 512, 100), (1000, 300, 0)]:
        starts = window_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tiled_equals_untiled_for_objects_seen_whole():
    # 1300 x 900 scene, windows of 400 sharing >= 120 pixels: objects of at most 50 pixels
    # (< overlap / 2), some across window seams, one in the corner.
    objects = [(20, 30, 40, 22), (270, 300, 50, 30), (380, 380, 30, 45), (700, 120, 24, 24), (555, 640, 48, 20),
               (1250, 860, 44, 36), (820, 420, 36, 50), (1000, 275, 50, 50), (0, 870, 30, 30)]
    image = colour_scene(900, 1300, objects)
    whole = colour_detector(image)
    assert len(whole["boxes"]) == len(objects)
    tiled = detect_tiled(colour_detector, image, tile=400, overlap=120)
    assert as_set(tiled) == as_set(whole)
    # without the ownership rule, cut-off duplicates would show up: check there are windows that cut objects
    cut = sum(len(colour_detector(image[:, y : y + 400, x : x + 400])["boxes"])
              for y in window_starts(900, 400, 120) for x in window_starts(1300, 400, 120))
    assert cut > len(objects)
    assert detect_tiled(colour_detector, image, tile=None, overlap=0)["boxes"].shape == (len(objects), 5)


def test_tiling_checks_overlap():
    with pytest.raises(RkdError, match="--overlap 400 must be >= 0 and smaller than --tile 400"):
        detect_tiled(colour_detector, colour_scene(900, 900, []), tile=400, overlap=400)


def test_model_detector_maps_boxes_back_to_file_pixels(exported):
    model, spec = load_exported(exported)
    image = read_image(sorted(UCAS_VAL.glob("*.png"))[0])
    detect = model_detector(model, spec["input_size"], spec["input"], score=0.0)
    det = detect(image)
    assert len(det["boxes"]) > 0
    # the same, by hand: letterbox, normalise, predict, then undo the scale
    sample = Sample(image, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                    "x", tuple(image.shape[-2:]))
    boxed, scale = letterbox(sample, spec["input_size"])
    ref = model.predict(normalize(boxed.image, spec["input"])[None], score_threshold=0.0)[0]
    inside = ref["boxes"][:, 1] / scale < image.shape[1]  # what lies on the bottom padding is dropped
    torch.testing.assert_close(det["boxes"][:, :4], ref["boxes"][inside][:, :4] / scale)
    torch.testing.assert_close(det["scores"], ref["scores"][inside])


def test_dota_lines_are_clipped_polygons():
    det = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 10.0, 0.0]]), "scores": torch.tensor([0.75]),
           "labels": torch.tensor([1])}
    assert dota_lines(det, CLASSES, (100, 100)) == ["30.0 25.0 0.0 25.0 0.0 15.0 30.0 15.0 plane 0.7500"]


@pytest.mark.parametrize("tile", [None, 512])
def test_predict_cli_on_ucas_images(exported, tmp_path, tile, capsys):
    out = tmp_path / "dets"
    argv = ["predict", str(exported), str(UCAS_VAL), "--out", str(out), "--score", "0.8"]
    if tile:
        argv += ["--tile", str(tile), "--overlap", "128"]
    assert rkd_main(argv) == 0
    images = sorted(UCAS_VAL.glob("*.png"))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.txt" for p in images)
    total = 0
    for path in images:
        h, w = read_image(path).shape[-2:]
        for line in (out / f"{path.stem}.txt").read_text().splitlines():
            fields = line.split()
            assert len(fields) == 10 and fields[8] in CLASSES and 0.8 < float(fields[9]) <= 1
            xs, ys = [float(v) for v in fields[0:8:2]], [float(v) for v in fields[1:8:2]]
            assert all(0 <= x <= w for x in xs) and all(0 <= y <= h for y in ys)
            total += 1
    assert total > 0
    assert f"detections in {len(images)} images" in capsys.readouterr().out


def test_predict_errors_are_clear(exported, tmp_path, capsys):
    assert rkd_main(["predict", str(exported), str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such image or folder" in capsys.readouterr().err
    assert rkd_main(["predict", str(tmp_path), str(UCAS_VAL)]) == 2
    assert "model_spec.json: missing" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert rkd_main(["predict", str(exported), str(tmp_path / "notes.txt")]) == 2
    assert "not an image file" in capsys.readouterr().err


@pytest.mark.parametrize("tile", [None, 512])
def test_onnxruntime_backend_equals_torch_on_ucas_scenes(exported_trained, tile):
    from test_export_e2e import same_detections

    torch_detect, _ = load_detector(exported_trained, "torch", 0.05, 0.1)
    ort_detect, _ = load_detector(exported_trained, "onnxruntime", 0.05, 0.1)
    total = 0
    for path in sorted(UCAS_VAL.glob("*.png"))[:2]:  # 1280x659 .. 1372x941 scenes: 6 windows of 512 each
        image = read_image(path)
        want = detect_tiled(torch_detect, image, tile, 128)
        got = detect_tiled(ort_detect, image, tile, 128)
        same_detections({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in want.items()}, True)
        total += len(want["boxes"])
    assert total > 10


def test_predict_skips_a_corrupt_image_and_finishes_the_rest(exported_trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted(UCAS_VAL.glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    # sorts between the two good ones, so images after it must still be processed
    (folder / f"{good[0].stem}_broken.png").write_bytes(good[0].read_bytes()[:2000])  # a truncated PNG
    out = tmp_path / "dets"
    code = rkd_main(["predict", str(exported_trained), str(folder), "--out", str(out), "--backend", "onnxruntime"])
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.txt" for p in good)
    err = capsys.readouterr().err
    assert "1 image(s) skipped" in err and f"{good[0].stem}_broken.png" in err and "cannot read image" in err
