"""The patch cache filled before training: every window kept once, exactly the on-the-fly pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rkd.data.cache import cache_dir
from rkd.data.cache_build import fill_patch_cache
from rkd.data.dataset import build_dataset, validate_data_spec
from rkd.errors import DataError

TILE = {"size": 256, "overlap": 64}


def dota_scenes(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """A DOTA folder (flat layout) of random scenes, each with one plane."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        (root / "labelTxt" / f"{name}.txt").write_text("10 10 60 10 60 40 10 40 plane 0\n")
    return root


def data_spec(root: Path, **extra) -> dict:
    spec = {"format": "dota", "root": str(root), "train_split": "all", "val_split": "all", "input_size": 128}
    return validate_data_spec({**spec, "tile": TILE, **extra})


def entries() -> list[Path]:
    return sorted(cache_dir().rglob("*.npy"))


def test_filling_keeps_every_window_once_with_the_on_the_fly_pixels_and_reports_progress(tmp_path):
    root = dota_scenes(tmp_path / "dota", {"a": (500, 700), "b": (300, 260), "c": (256, 256)})
    spec = data_spec(root)
    lines: list[str] = []
    fill = fill_patch_cache(spec, lines.append, threads=2, progress_every_s=0.0)
    patches = build_dataset(spec, "train", train=False).records
    assert (fill.scenes, fill.decoded, fill.patches) == (3, 3, len(patches)) == (3, 3, len(entries()))
    # with a line after every scene: 2 of 3 checked against the cache, then decoded
    assert [line.split(" (")[0] for line in lines[:2]] == [
        f"[data] patch cache: {i}/3 scene(s) checked" for i in (1, 2)
    ]
    assert lines[2].startswith(f"[data] patch cache: decoding 3 of 3 scene(s) once, {len(patches)} window(s)")
    assert [line.split(" (")[0] for line in lines[3:5]] == [
        f"[data] patch cache: {i}/3 scene(s) decoded" for i in (1, 2)
    ]
    assert lines[-1].startswith(f"[data] patch cache: kept {len(patches)} window(s) of 3 scene(s)")
    # every kept window is the window the on-the-fly path cuts from the scene
    on_the_fly = build_dataset(data_spec(root, patch_cache=False), "train", train=False).records
    for cached, direct in zip(patches, on_the_fly):
        assert torch.equal(cached.load_image(), direct.load_image())
    # a second fill decodes nothing; a rewritten scene (same size) is decoded again, alone
    again: list[str] = []
    assert fill_patch_cache(spec, again.append).decoded == 0
    assert again == [f"[data] patch cache: the windows of all 3 scene(s) are kept in {cache_dir()}"]
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(root / "images" / "b.png")
    refill = fill_patch_cache(spec, lambda line: None)
    assert (refill.decoded, refill.patches) == (1, sum(p.image_id.startswith("b__") for p in patches))


def test_nothing_is_filled_without_tiles_or_with_the_cache_off(tmp_path):
    root = dota_scenes(tmp_path / "dota", {"a": (300, 300)})
    lines: list[str] = []
    untiled = validate_data_spec({"format": "dota", "root": str(root), "train_split": "all", "val_split": "all"})
    for spec in (untiled, data_spec(root, patch_cache=False)):
        assert fill_patch_cache(spec, lines.append).scenes == 0
    assert lines == [] and entries() == []


def test_a_scene_that_does_not_decode_names_its_file(tmp_path):
    root = dota_scenes(tmp_path / "dota", {"a": (300, 300), "b": (300, 300)})
    broken = root / "images" / "b.png"
    broken.write_bytes(broken.read_bytes()[:200])  # the header reads, the pixels do not
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        fill_patch_cache(data_spec(root), lambda line: None)


SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "skeleton.yaml"


def tiled_spec_file(tmp_path: Path) -> Path:
    root = dota_scenes(tmp_path / "dota", {"a": (300, 400)})
    model = "{kind: retinanet, boxes: obb, backbone: {name: convnet, width: 0.5, depth: 1}, neck: {channels: 32}}"
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: tiled\noutput_dir: {tmp_path / 'runs'}\n"
        f"data: {{format: dota, root: {root}, train_split: all, val_split: all, input_size: 128, "
        f"tile: {{size: 256, overlap: 64}}}}\nteacher: {{model: {model}, epochs: 1}}\n"
        f"student: {{model: {model}, epochs: 1}}\nsearch: {{space: {SPACE}, trials: 1}}\n"
    )
    return path


class TrainingStarts(Exception):
    """Raised where training would start: the test has seen what it needs."""


def test_rkd_train_and_search_fill_the_cache_before_the_teacher_stage(tmp_path, monkeypatch):
    """The wiring (Ray and the training are stubbed: what is asserted is the order of the stages)."""
    import rkd.search.preflight
    import rkd.search.runner
    import rkd.train.runner
    import rkd.train.stages
    from rkd.cli import main
    from rkd.train.spec import load_spec

    path = tiled_spec_file(tmp_path)
    kept_at_start: list[int] = []

    def training_starts(*args, **kwargs):
        kept_at_start.append(len(entries()))
        raise TrainingStarts

    windows = len(build_dataset(load_spec(path).data, "train", train=False))
    for module in (rkd.train.runner, rkd.search.runner):
        monkeypatch.setattr(module, "ensure_ray", lambda address: None)
    for module in (rkd.search.preflight, rkd.search.runner):
        monkeypatch.setattr(module, "check_resources", lambda spec: None)
    monkeypatch.setattr(rkd.train.stages, "run_stages", training_starts)
    monkeypatch.setattr(rkd.search.runner, "prepare_teacher", training_starts)
    with pytest.raises(TrainingStarts):
        main(["train", str(path)])
    for entry in entries():
        entry.unlink()
    with pytest.raises(TrainingStarts):
        main(["search", str(path)])
    assert kept_at_start == [windows, windows] and windows > 1


def test_a_run_fills_the_cache_before_training_only_where_its_trials_run(tmp_path, monkeypatch):
    from rkd.search.preflight import fill_data_caches
    from rkd.train.spec import load_spec

    spec = load_spec(tiled_spec_file(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster: its nodes fill their own caches
    lines: list[str] = []
    fill_data_caches(spec, lines.append)
    assert lines == [] and entries() == []
    monkeypatch.delenv("RAY_ADDRESS")
    fill_data_caches(spec, lines.append)
    assert len(entries()) == len(build_dataset(spec.data, "train", train=False)) > 1
    assert lines[-1].startswith("[data] patch cache: kept ")
