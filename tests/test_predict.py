"""`rkd predict`: an exported student on real UCAS-AOD images, DOTA output, tiling of large scenes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import CLASSES, make_run, rkd_main, rows_of

from rkd.data.images import read_image, read_rgb
from rkd.data.sample import Sample
from rkd.data.transforms import letterbox
from rkd.deploy import postprocess
from rkd.deploy.export import export_student
from rkd.deploy.load import load_exported
from rkd.deploy.predict import (
    detect_tiled,
    dota_lines,
    hbb_to_le90,
    load_detector,
    model_detector,
    window_starts,
)
from rkd.errors import RkdError
from rkd.geometry import hbb_to_obb
from rkd.train.checkpoint import atomic_torch_save, read_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UCAS_VAL = SHARED / "ucas50" / "images" / "val"
AID_VAL = SHARED / "aid150" / "val"


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
    from ucas_detectors import trained, ucas_batches

    state = trained("retinanet", "obb", ucas_batches()).state_dict()  # the same architecture as t_small
    return export_t_small(tmp_path_factory.mktemp("predict_trained"), state, ["safetensors", "onnx"])


# --- a detector whose output is known: it finds each uniquely coloured rectangle it sees --------------


def colour_scene(height: int, width: int, objects: list[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """``(H, W, 3)``: noise in channels 0-1 below 200 and blue 0; object ``i`` is the colour (200 + i, 255, 255)."""
    image = np.random.default_rng(seed).integers(0, 200, (height, width, 3), dtype=np.uint8)
    image[..., 2] = 0
    for i, (x0, y0, w, h) in enumerate(objects):
        image[y0 : y0 + h, x0 : x0 + w] = (200 + i, 255, 255)
    return image


def colour_detector(image: np.ndarray) -> dict[str, np.ndarray]:
    """Box of the visible pixels of each object colour; an object cut by the window edge scores lower."""
    boxes, scores, labels = [], [], []
    marked = image[..., 2] == 255
    for value in np.unique(image[..., 0][marked]).tolist():
        ys, xs = np.nonzero(marked & (image[..., 0] == value))
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        w, h = x1 - x0, y1 - y0
        # le90: w >= h; a tall box is the wide one turned by -90 degrees
        box = (
            [(x0 + x1) / 2, (y0 + y1) / 2, w, h, 0.0] if w >= h else [(x0 + x1) / 2, (y0 + y1) / 2, h, w, -math.pi / 2]
        )
        boxes.append(box)
        scores.append(0.5 + 0.4 * min(1.0, len(xs) / 2000))
        labels.append((value - 200) % 2)
    return {
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 5),
        "scores": np.array(scores, dtype=np.float32),
        "labels": np.array(labels, dtype=np.int64),
    }


def as_set(det: dict[str, np.ndarray]) -> set[tuple]:
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
    objects = [
        (20, 30, 40, 22),
        (270, 300, 50, 30),
        (380, 380, 30, 45),
        (700, 120, 24, 24),
        (555, 640, 48, 20),
        (1250, 860, 44, 36),
        (820, 420, 36, 50),
        (1000, 275, 50, 50),
        (0, 870, 30, 30),
    ]
    image = colour_scene(900, 1300, objects)
    whole = colour_detector(image)
    assert len(whole["boxes"]) == len(objects)
    tiled = detect_tiled(colour_detector, image, tile=400, overlap=120)
    assert as_set(tiled) == as_set(whole)
    # without the ownership rule, cut-off duplicates would show up: check there are windows that cut objects
    cut = sum(
        len(colour_detector(image[y : y + 400, x : x + 400])["boxes"])
        for y in window_starts(900, 400, 120)
        for x in window_starts(1300, 400, 120)
    )
    assert cut > len(objects)
    assert detect_tiled(colour_detector, image, tile=None, overlap=0)["boxes"].shape == (len(objects), 5)


def test_tiling_checks_overlap():
    with pytest.raises(RkdError, match="--overlap 400 must be >= 0 and smaller than --tile 400"):
        detect_tiled(colour_detector, colour_scene(900, 900, []), tile=400, overlap=400)


def training_letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """Training's letterbox (rkd.data.transforms) of a ``(3, H, W)`` image."""
    sample = Sample(
        image,
        torch.zeros(0, 5),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
        "x",
        tuple(image.shape[-2:]),
    )
    boxed, scale = letterbox(sample, size)
    return boxed.image, scale


def test_model_detector_maps_boxes_back_to_file_pixels(exported):
    model, spec = load_exported(exported)
    image = read_image(sorted(UCAS_VAL.glob("*.png"))[0])
    detect = model_detector(model, spec["input_size"], spec["input"], score=0.0)
    det = detect(image.permute(1, 2, 0).numpy())
    assert len(det["boxes"]) > 0
    # the same, by hand with training's letterbox and normalisation: predict, then undo the scale
    boxed, scale = training_letterbox(image, spec["input_size"])
    mean, std = torch.tensor(spec["input"]["mean"]).view(3, 1, 1), torch.tensor(spec["input"]["std"]).view(3, 1, 1)
    ref = model.predict(((boxed.float() / 255 - mean) / std)[None], score_threshold=0.0)[0]
    inside = ref["boxes"][:, 1] / scale < image.shape[1]  # what lies on the bottom padding is dropped
    torch.testing.assert_close(
        torch.from_numpy(det["boxes"][:, :4]), ref["boxes"][inside][:, :4] / scale, atol=1e-3, rtol=1e-5
    )
    torch.testing.assert_close(torch.from_numpy(det["scores"]), ref["scores"][inside], atol=1e-5, rtol=0)


def test_numpy_letterbox_and_resize_give_trainings_pixels_on_real_images():
    """rkd predict's numpy preprocessing against training's torch resampling, shrinking and enlarging:
    at most one pixel value in 10^4 differs, by 1 (float32 rounding order)."""
    differing = total = 0
    for path in [*sorted(UCAS_VAL.glob("*.png"))[:2], *sorted(AID_VAL.glob("*/*.jpg"))[:2]]:
        image = read_image(path)
        for size in (320, 512, 1024):
            want, want_scale = training_letterbox(image, size)
            got, scale = postprocess.letterbox(image.permute(1, 2, 0).numpy(), size)
            diff = np.abs(got.astype(int) - want.permute(1, 2, 0).numpy().astype(int))
            assert scale == want_scale and diff.max() <= 1, (path.name, size)
            differing, total = differing + int((diff > 0).sum()), total + diff.size
        # scene classifiers: antialiased bilinear to a square, float (SceneDataset)
        want = (
            F.interpolate(image.float()[None], size=(128, 128), mode="bilinear", align_corners=False, antialias=True)[0]
            .clamp(0, 255)
            .permute(1, 2, 0)
            .numpy()
        )
        got = postprocess.resize(image.permute(1, 2, 0).numpy(), 128, 128).clip(0, 255)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert differing / total < 1e-4


def test_horizontal_boxes_become_le90_as_in_rkd_geometry():
    xyxy = np.array([[0.0, 0, 4, 2], [10, 10, 12, 20], [5, 5, 8, 8]], dtype=np.float32)
    np.testing.assert_allclose(hbb_to_le90(xyxy), hbb_to_obb(torch.from_numpy(xyxy)).numpy(), atol=1e-6)


def test_dota_lines_are_clipped_polygons():
    det = {"boxes": np.array([[10.0, 20.0, 40.0, 10.0, 0.0]]), "scores": np.array([0.75]), "labels": np.array([1])}
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
        h, w = read_rgb(path).shape[:2]
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
    from ucas_detectors import same_detections

    torch_detect, _ = load_detector(exported_trained, "torch", 0.05, 0.1)
    ort_detect, _ = load_detector(exported_trained, "onnxruntime", 0.05, 0.1)
    total = 0
    for path in sorted(UCAS_VAL.glob("*.png"))[:2]:  # 1280x659 .. 1372x941 scenes: 6 windows of 512 each
        image = read_rgb(path)
        want = detect_tiled(torch_detect, image, tile, 128)
        got = detect_tiled(ort_detect, image, tile, 128)
        same_detections(got, want, True)
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


def test_predict_runs_without_torch_and_equals_the_torch_backend(exported_trained, tmp_path):
    """With torch not importable, rkd predict picks onnxruntime by itself; its files equal torch's."""
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(UCAS_VAL.glob("*.png"))[:2]:
        (images / path.name).symlink_to(path)
    args = [str(exported_trained), str(images), "--score", "0.05", "--tile", "512", "--overlap", "128"]
    assert rkd_main(["predict", *args, "--out", str(tmp_path / "torch"), "--backend", "torch"]) == 0
    blocked = "import sys; sys.modules['torch'] = None; from rkd.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", blocked, "predict", *args, "--out", str(tmp_path / "ort")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [sys.executable, "-c", blocked, "predict", *args, "--out", str(tmp_path / "x"), "--backend", "torch"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "--backend torch needs PyTorch" in run.stderr
    total = 0
    for path in sorted(images.iterdir()):
        want = [line.split() for line in (tmp_path / "torch" / f"{path.stem}.txt").read_text().splitlines()]
        got = [line.split() for line in (tmp_path / "ort" / f"{path.stem}.txt").read_text().splitlines()]
        assert len(got) == len(want) and [g[8] for g in got] == [w[8] for w in want]
        # corners are written to 0.1 px and scores to 1e-4: allow one unit of the last digit
        np.testing.assert_allclose(
            np.array([g[:8] for g in got], float), np.array([w[:8] for w in want], float), atol=0.1 + 1e-9
        )
        np.testing.assert_allclose(
            np.array([g[9] for g in got], float), np.array([w[9] for w in want], float), atol=1e-4 + 1e-9
        )
        total += len(want)
    assert total > 10


def test_the_readme_snippet_runs_with_onnxruntime_alone_and_finds_what_predict_finds(exported_trained, monkeypatch):
    """The model card's ten lines, run as written beside model.onnx (torch blocked), on a UCAS-AOD scene."""
    from rkd.deploy.files import README_FILE

    text = (exported_trained / README_FILE).read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scene = sorted(UCAS_VAL.glob("*.png"))[0]
    # the briefly trained model scores below the card's 0.3: keep more
    code = code.replace('"scene.png"', repr(str(scene))).replace("score_threshold=0.3", "score_threshold=0.05")
    monkeypatch.chdir(exported_trained)
    monkeypatch.syspath_prepend(str(exported_trained))
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "postprocess", raising=False)
    namespace: dict = {"print": lambda *args: None}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the card's own snippet
    monkeypatch.delitem(sys.modules, "torch")  # back to the real one for the reference
    monkeypatch.undo()
    detect, _ = load_detector(exported_trained, "torch", 0.05, 0.1)
    want = detect(read_rgb(scene))
    got = namespace["det"]
    # predict also drops what lies on the letterbox padding; the snippet keeps it
    image_h, image_w = read_rgb(scene).shape[:2]
    inside = (got["boxes"][:, 0] < image_w) & (got["boxes"][:, 1] < image_h)
    from ucas_detectors import same_detections

    same_detections({k: v[inside] for k, v in got.items()}, want, True)
    assert len(want["boxes"]) > 0
