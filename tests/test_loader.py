"""The training loader's speed-ups change no pixel: the patch cache, memory caching, worker seeds, data.workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from rkd.data.cache import cache_dir
from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.data.loading import EpochIndices, SeededSamples, loader_options
from rkd.data.sample import DetectionRecord, empty_targets
from rkd.data.tiling import tile_records
from rkd.data.ucas import read_ucas
from rkd.errors import DataError, SpecError

UCAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucas50"


def scene_record(path: Path) -> DetectionRecord:
    with Image.open(path) as im:
        size = (im.height, im.width)
    boxes, labels, difficult = empty_targets()
    return DetectionRecord(path.stem, size, boxes, labels, difficult, image_path=path)


def patch_pixels(records: list[DetectionRecord], cached: bool) -> list[torch.Tensor]:
    return [r.load_image() for r in tile_records(records, 400, 100, patch_cache=cached)]


def cache_entries() -> list[Path]:
    return sorted(cache_dir().rglob("*.npy"))


@pytest.mark.skipif(not UCAS.is_dir(), reason="../shared/data/ucas50 not present")
def test_the_patch_cache_returns_exactly_the_on_the_fly_pixels_and_decodes_a_scene_once():
    records = read_ucas(UCAS, "val")[0][:2]  # RGBA PNGs with an opaque alpha
    expected = patch_pixels(records, cached=False)
    assert cache_entries() == []  # the on-the-fly path keeps nothing
    patches = tile_records(records, 400, 100, patch_cache=True)
    first = patches[0].load_image()
    # One miss cut every window of its scene: the scene's other patches are hits.
    assert len(cache_entries()) == sum(p.render.source is records[0] for p in patches)
    built = [first] + [p.load_image() for p in patches[1:]]
    hits = patch_pixels(records, cached=True)
    assert len(cache_entries()) == len(patches)
    for want, got, again in zip(expected, built, hits):
        assert got.dtype == torch.uint8 and torch.equal(got, want) and torch.equal(again, want)


def test_a_16_bit_scene_keeps_the_per_patch_scaling_of_the_on_the_fly_path(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, (700, 900), dtype=np.uint16)
    values[:100, :100] = 60000  # one bright corner: a scaling by the scene's maximum would differ
    Image.fromarray(values).save(tmp_path / "scene.png")
    record = scene_record(tmp_path / "scene.png")
    for want, got in zip(patch_pixels([record], cached=False), patch_pixels([record], cached=True)):
        assert torch.equal(got, want)


def test_a_changed_image_is_decoded_again_even_with_the_same_size_and_mtime(tmp_path):
    path = tmp_path / "scene.bmp"  # uncompressed: the new pixels give a file of the same size
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(path)
    record = scene_record(path)
    before = patch_pixels([record], cached=True)
    stat = path.stat()
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a rewrite the clock cannot tell apart
    assert path.stat().st_size == stat.st_size
    after = patch_pixels([record], cached=True)
    assert all(torch.equal(a, b) for a, b in zip(after, patch_pixels([record], cached=False)))
    assert not torch.equal(before[0], after[0])


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (500, 500, 3), dtype=np.uint8)).save(path)
    record = scene_record(path)
    expected = patch_pixels([record], cached=True)
    for entry in cache_entries():
        entry.write_bytes(b"not an array")
    assert all(torch.equal(a, b) for a, b in zip(patch_pixels([record], cached=True), expected))


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_data_workers_is_a_spec_error_naming_data_workers(tmp_path, value):
    from rkd.train.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: t\ndata: {{format: synthetic, input_size: 64, workers: {value!r}}}\n"
        "teacher: {model: {kind: retinanet, backbone: {name: convnet, width: 0.25}}, epochs: 1}\n"
        "student: {model: {kind: retinanet, backbone: {name: convnet, width: 0.25}}, epochs: 1}\n"
    )
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert err.value.path == "data.workers" and "integer >= 0" in str(err.value)


def test_loader_settings_stay_out_of_a_spec_that_does_not_set_them():
    plain = validate_data_spec({"format": "synthetic", "input_size": 64})
    assert not {"workers", "patch_cache", "memory_mb"} & set(plain)  # run and teacher hashes unchanged
    set_ = validate_data_spec({"format": "synthetic", "input_size": 64, "workers": 2, "memory_mb": 0})
    assert set_["workers"] == 2 and set_["memory_mb"] == 0


def batches(workers: int, epochs: int = 2) -> list[torch.Tensor]:
    spec = validate_data_spec(
        {
            "format": "synthetic",
            "input_size": 64,
            "num_train": 6,
            "augment": {"flip": True, "rot90": True, "color": 0.3},
        }
    )
    dataset = build_dataset(spec, "train", train=True)
    indices = EpochIndices(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = DataLoader(
        SeededSamples(dataset, seed=5),
        batch_size=2,
        sampler=indices,
        collate_fn=collate_detection,
        **loader_options(workers, torch.device("cpu")),
    )
    out = []
    for epoch in range(epochs):
        indices.epoch = epoch
        out += [images for images, _, _ in loader]
    return out


def test_worker_processes_draw_the_same_augmentations_whatever_their_count():
    one, two = batches(1), batches(2)
    assert len(one) == 6 and all(torch.equal(a, b) for a, b in zip(one, two))
    assert all(torch.equal(a, b) for a, b in zip(batches(0), one))  # the seeds are per sample, not per process


def test_decoded_images_stay_in_memory_across_epochs_within_the_limit():
    spec = validate_data_spec({"format": "synthetic", "input_size": 64, "num_train": 4, "memory_mb": 1})
    dataset = build_dataset(spec, "train", train=False)
    first = [dataset[i].image for i in range(4)]
    assert len(dataset.memory.kept) == 4 and dataset.memory.used == 4 * 3 * 64 * 64
    assert all(torch.equal(a, dataset[i].image) for i, a in enumerate(first))
    none = build_dataset({**spec, "memory_mb": 0}, "train", train=False)
    assert all(torch.equal(a, none[i].image) for i, a in enumerate(first)) and not none.memory.kept


def test_an_unwritable_patch_cache_is_a_data_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "scene.png"
    Image.fromarray(np.zeros((300, 300, 3), dtype=np.uint8)).save(path)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RKD_PATCH_CACHE", str(tmp_path / "a-file" / "cache"))  # under a file: cannot be made
    with pytest.raises(DataError, match=r"patch cache .*a-file.*data.patch_cache: false"):
        patch_pixels([scene_record(path)], cached=True)


def test_rkd_cache_lists_the_patch_cache_and_prunes_the_scenes_built_before_a_date(tmp_path, capsys):
    from rkd.cli import main

    rng = np.random.default_rng(3)
    records = []
    for name in ("old", "new"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8)).save(path)
        records.append(scene_record(path))
    expected = patch_pixels(records, cached=True)
    entries = cache_entries()
    per_scene = len(entries) // 2
    assert main(["cache", "ls"]) == 0
    listed = capsys.readouterr().out
    size_mb = sum(e.stat().st_size for e in entries) / 1e6
    assert f"{len(entries)} decoded patch(es) of 2 scene(s), {size_mb:.1f} MB" in listed
    # the old scene's patches were built ten days ago
    ten_days_ago = os.path.getmtime(entries[0]) - 10 * 86400
    old_folder = [e.parent for e in entries if e.parent.name != entries[-1].parent.name][0]
    for entry in old_folder.glob("*.npy"):
        os.utime(entry, (ten_days_ago, ten_days_ago))
    assert main(["cache", "prune", "--patches", "--older-than", "5"]) == 0
    assert "deleted the decoded patches of 1 scene(s)" in capsys.readouterr().out
    assert not old_folder.exists() and len(cache_entries()) == per_scene
    # what is pruned is decoded again, to the same pixels
    assert all(torch.equal(a, b) for a, b in zip(patch_pixels(records, cached=True), expected))
    assert len(cache_entries()) == 2 * per_scene
    assert main(["cache", "prune", "--patches", "--all"]) != 0
    assert "takes --older-than DAYS or nothing" in capsys.readouterr().err
    assert main(["cache", "prune", "--patches"]) == 0 and cache_entries() == []
