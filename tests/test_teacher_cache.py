"""Trained teachers kept by content (rkd.train.teacher_cache): a second run with the same teacher and
data, under another name, copies it instead of training it; `rkd cache ls` / `prune` see and free it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from rkd.cli import main
from rkd.train import teacher_cache

pytestmark = pytest.mark.slow


def teacher_spec(tmp: Path, name: str) -> Path:
    model = {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": 0.25, "depth": 1},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    spec = {
        "name": name,
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128, "seed": 3},
        "teacher": {"model": model, "epochs": 1, "batch_size": 4},
        "student": {"model": model, "epochs": 1, "batch_size": 4},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(tmp / name),  # a different output folder too: nothing is shared but the cache
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_run_of_another_name_reuses_the_trained_teacher_and_prune_frees_it(tmp_path, capsys):
    try:
        assert main(["train", str(teacher_spec(tmp_path, "first")), "--stage", "teacher"]) == 0
        assert "[teacher] training 1 epochs" in capsys.readouterr().out
        (kept,) = teacher_cache.entries()
        assert kept["run"] == "first" and kept["source"] == "trained"

        assert main(["train", str(teacher_spec(tmp_path, "second")), "--stage", "teacher"]) == 0
        out = capsys.readouterr().out
        assert "[teacher] training" not in out and "reusing the teacher trained for run 'first'" in out
        first, second = (tmp_path / n / n / "teacher" for n in ("first", "second"))
        assert (second / "teacher.pt").read_bytes() == (first / "teacher.pt").read_bytes()
        record = json.loads((second / "teacher.json").read_text())
        assert record["source"] == "cached" and record["checkpoint"] == str(second / "teacher.pt")
        assert record["map50"] == json.loads((first / "teacher.json").read_text())["map50"]
        assert not (tmp_path / "second" / "second" / "ray").exists()  # no Ray training of its own

    finally:
        ray.shutdown()
    # another teacher (as other data would give), kept beside the first
    other = teacher_cache.store("f" * 16, first / "teacher.pt", {**kept, "run": "third"})
    assert other.name == "f" * 16 and teacher_cache.lookup("f" * 16)[1]["run"] == "third"

    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert "2 trained teacher(s) kept" in listing and "run 'first'" in listing and "run 'third'" in listing
    assert main(["cache", "prune"]) == 2
    assert "name the teachers" in capsys.readouterr().err
    assert main(["cache", "prune", "zzz"]) == 2
    assert "'zzz' names no kept teacher" in capsys.readouterr().err
    assert main(["cache", "prune", kept["hash"][:8]]) == 0
    assert "deleted 1 kept teacher(s)" in capsys.readouterr().out
    assert [e["run"] for e in teacher_cache.entries()] == ["third"]
    assert (first / "teacher.pt").is_file()  # a run's own copy stays
    assert main(["cache", "prune", "--all"]) == 0 and teacher_cache.entries() == []
