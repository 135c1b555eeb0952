"""Bad specs, spaces, images, labels and checkpoints, run through the CLI as a user would: each
stops before any training with exit code 2 (1 for `rkd data check`'s findings) and a message
that names what is wrong and where. Nothing here trains a model; one case starts a local Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rkd.cli import main

MODEL = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 16},
    "head": {"convs": 1},
}


def base_spec(tmp_path: Path) -> dict[str, Any]:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"student": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}}))
    return {
        "name": "bad",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 4, "num_val": 2, "input_size": 64},
        "teacher": {"model": MODEL, "epochs": 1, "batch_size": 2},
        "student": {"model": MODEL, "epochs": 1, "batch_size": 2},
        "search": {"space": str(space), "trials": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(tmp_path / "runs"),
    }


def set_space(tmp_path: Path, spec: dict, space: dict) -> None:
    Path(spec["search"]["space"]).write_text(yaml.safe_dump(space))


def write_png(path: Path, size: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def ucas_set(root: Path) -> Path:
    """Two splits of two 32x32 images, one object each (UCAS/YOLO: class + 4 normalised corners)."""
    for split in ("train", "val"):
        for i in range(2):
            write_png(root / "images" / split / f"{split}{i}.png", seed=i)
            label = root / "labels" / split / f"{split}{i}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("0 0.2 0.2 0.6 0.2 0.6 0.6 0.2 0.6\n")
    return root


def truncated_image(tmp_path: Path, spec: dict) -> None:
    root = ucas_set(tmp_path / "ucas")
    image = root / "images" / "train" / "train1.png"
    image.write_bytes(image.read_bytes()[:200])  # the header reads, the pixels do not
    spec["data"] = {"format": "ucas", "root": str(root), "classes": ["plane", "car"], "input_size": 64}


def checkpoint_without_model_spec(tmp_path: Path, spec: dict) -> None:
    path = tmp_path / "teacher.pt"
    torch.save({"format": 1, "kind": "detector", "num_classes": 2, "state_dict": {}}, path)
    spec["teacher"]["checkpoint"] = str(path)


def output_under_a_file(tmp_path: Path, spec: dict) -> None:
    (tmp_path / "a_file").write_text("")
    spec["output_dir"] = str(tmp_path / "a_file" / "runs")


def shell_prior(tmp_path: Path, spec: dict) -> None:
    command = f"touch {tmp_path / 'ran'}"
    spec["student"]["methods"] = {
        "ifkd": {"prior": {"kind": "module", "target": "os:system", "args": {"command": command}}}
    }


def methods_space(tmp_path: Path, spec: dict, hinton: dict) -> None:
    set_space(tmp_path, spec, {"methods": {"hinton": hinton}})


def student(**entries: Any) -> Callable[[Path, dict], None]:
    return lambda tmp_path, spec: spec["student"].update(entries)


# (id, change to the valid base spec, message fragments); every one exits 2 before any training.
SPEC_CASES = [
    ("name-dotdot", lambda t, s: s.update(name=".."), ["name: one plain folder name", "'..'"]),
    ("name-dot", lambda t, s: s.update(name="."), ["name: one plain folder name"]),
    ("lr-nan", student(lr=float("nan")), ["student.lr: expected a finite number"]),
    ("lr-inf", student(lr=float("inf")), ["student.lr: expected a finite number"]),
    ("lr-zero", student(lr=0.0), ["student.lr: must be > 0"]),
    (
        "min-map-nan",
        lambda t, s: s["teacher"].update(min_map=float("nan")),
        ["teacher.min_map: expected a finite number"],
    ),
    (
        "negative-kd-weight",
        student(methods={"hinton": {"weight": -1.0}}),
        ["student.methods.hinton.weight: must be > 0"],
    ),
    (
        "zero-temperature",
        student(methods={"hinton": {"temperature": 0}}),
        ["student.methods.hinton.temperature: must be > 0"],
    ),
    (
        "space-step-and-log",
        lambda t, s: set_space(t, s, {"student": {"lr": {"low": 1e-3, "high": 5e-3, "log": True, "step": 1e-3}}}),
        ["student.lr.step: a range cannot have both step and log"],
    ),
    (
        "space-log-string",
        lambda t, s: set_space(t, s, {"student": {"lr": {"low": 1e-3, "high": 5e-3, "log": "false"}}}),
        ["student.lr.log: expected true or false, got 'false'"],
    ),
    (
        "space-negative-weight",
        lambda t, s: methods_space(t, s, {"weight": {"low": -1.0, "high": 1.0}}),
        ["methods.hinton.weight.low: must be > 0"],
    ),
    (
        "space-zero-temperature",
        lambda t, s: methods_space(t, s, {"temperature": 0}),
        ["methods.hinton.temperature: must be > 0"],
    ),
    (
        "space-misspelt-method",
        lambda t, s: set_space(t, s, {"methods": {"hintn": {"weight": "default"}}}),
        [":2: methods.hintn: unknown KD method (did you mean 'hinton'?)"],
    ),
    (
        "initial-point-outside",
        lambda t, s: s["search"].update(initial_points=[{"student.lr": 0.5}]),
        ["search.initial_points.0.student.lr: 0.5 is outside the space's [0.001, 0.005] log float"],
    ),
    (
        "truncated-image",
        truncated_image,
        ["image(s) of the data whose pixels do not decode", "train1.png: cannot read image"],
    ),
    ("checkpoint-without-model-spec", checkpoint_without_model_spec, ["teacher.checkpoint:", "has no model_spec"]),
    ("output-dir-not-creatable", output_under_a_file, ["output_dir: cannot create"]),
    (
        "code-in-spec",
        shell_prior,
        ["student.methods.ifkd.prior.target: names Python code", "--allow-code", "RKD_ALLOW_CODE=1"],
    ),
]


@pytest.mark.parametrize(("change", "fragments"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_a_bad_spec_stops_before_training(tmp_path, capsys, monkeypatch, change, fragments):
    monkeypatch.delenv("RKD_ALLOW_CODE", raising=False)
    spec = base_spec(tmp_path)
    change(tmp_path, spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert "Traceback" not in err and not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "a_file" / "runs").exists()  # nothing was started


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("student:\n  lr: 0.1\n  lr: 0.2\n", [":3: student.lr: given twice (also on line 2)"]),
        (b"name: caf\xe9\n", [":1: not UTF-8 text", "save it as UTF-8"]),
    ],
    ids=["duplicate-key", "not-utf8"],
)
def test_a_spec_file_that_does_not_read_cleanly(tmp_path, capsys, text, fragments):
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(f"{path}{f}" in err or f in err for f in fragments) and f"{path}:" in err, err


def test_allow_code_lets_the_spec_import_its_target(tmp_path, capsys, monkeypatch):
    """With the opt-in the same spec passes validation (the target imports); it is refused without it."""
    from rkd.train.spec import load_spec

    monkeypatch.delenv("RKD_ALLOW_CODE", raising=False)
    spec = base_spec(tmp_path)
    spec["student"]["methods"] = {
        "ifkd": {"prior": {"kind": "module", "target": "rkd.distill.priors:EdgeSaliencyPrior"}}
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["flops", str(path)]) == 2 and "--allow-code" in capsys.readouterr().err
    monkeypatch.setenv("RKD_ALLOW_CODE", "1")
    assert load_spec(path).student.methods["ifkd"]["prior"]["target"] == "rkd.distill.priors:EdgeSaliencyPrior"


def test_results_of_an_unfinished_search_say_so(tmp_path, capsys):
    run = tmp_path / "runs" / "half"
    (run / "ray" / "search").mkdir(parents=True)
    (run / "search_identity.json").write_text("{}")
    assert main(["results", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: the search of this folder is unfinished" in err and "rkd search" in err
    assert main(["results", str(tmp_path)]) == 2
    assert "is " + str(tmp_path) + " a search run folder" in capsys.readouterr().err


def test_export_of_an_unfinished_search_says_so(tmp_path, capsys):
    run = tmp_path / "runs" / "half"
    (run / "ray" / "search").mkdir(parents=True)
    (run / "search_identity.json").write_text("{}")
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert f"{run}: the search of this folder is unfinished" in err and "rkd search" in err
    assert not (tmp_path / "model").exists()


def test_data_check_lists_every_problem_of_a_split(tmp_path, capsys):
    """An unreadable image no longer hides the label problems after it; a box outside its image is one."""
    root = ucas_set(tmp_path / "ucas")
    broken = root / "images" / "train" / "train0.png"
    broken.write_bytes(b"not an image at all")
    bad_line = root / "labels" / "train" / "train1.txt"
    bad_line.write_text("0 0.2 0.2 0.6\n")
    assert main(["data", "check", str(root), "--format", "ucas", "--classes", "plane,car"]) == 1
    out = capsys.readouterr().out
    assert f"{broken}: cannot read image header" in out
    assert f"{bad_line}:1: expected 9 fields" in out
    assert "2 problem(s)" in out


def test_data_check_finds_a_box_outside_its_image(tmp_path, capsys):
    """DOTA labels are in pixels: a polygon beyond the image's edges parses, and is no object of it."""
    image = write_png(tmp_path / "images" / "a.png")
    (tmp_path / "labelTxt").mkdir()
    (tmp_path / "labelTxt" / "a.txt").write_text("2 2 10 2 10 10 2 10 plane 0\n40 40 50 40 50 50 40 50 plane 0\n")
    assert main(["data", "check", str(tmp_path), "--format", "dota"]) == 1
    out = capsys.readouterr().out
    assert (
        f"{image}: box 1 (centre 45.0, 45.0) lies entirely outside the 32x32 image" in out and "1 problem(s)" in out
    ), out


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["cpus_per_worker", "gpus_per_worker"])
def test_a_worker_larger_than_the_machine_is_refused_before_the_teacher(entry, tmp_path, capsys):
    import os

    import ray
    import torch

    if entry == "gpus_per_worker" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: a quarter of one fits")
    spec = base_spec(tmp_path)
    # a fractional GPU (four small students on one GPU) on a machine without any
    spec["resources"][entry] = (os.cpu_count() or 1) + 64 if entry == "cpus_per_worker" else 0.25
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        assert main(["search", str(path)]) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    kind = "CPUs" if entry == "cpus_per_worker" else "GPUs"
    assert f"resources.{entry}: asks" in err and f"{kind} per worker, but this machine has" in err, err
    assert not (tmp_path / "runs" / "bad" / "teacher").exists()
