"""A finished search survives a rerun of another spec under its name, and a trial whose finite loss
blew up is `diverged`, never on the front. Real Ray Tune + Train and Optuna on the synthetic set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from rkd.cli import main

pytestmark = pytest.mark.slow

MODEL = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 16},
    "head": {"convs": 1},
}
SANE_LR, WILD_LR = 3e-3, 10.0


def write_spec(tmp_path: Path, seed: int = 0, space: dict | None = None) -> Path:
    space_path = tmp_path / f"space{seed}.yaml"
    space_path.write_text(yaml.safe_dump(space or {"student": {"lr": {"choices": [SANE_LR, WILD_LR]}}}))
    spec = {
        "name": "kept",
        "seed": seed,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128},
        "teacher": {"model": MODEL, "epochs": 1, "batch_size": 4},
        # no warm-up: lr 10 acts from the second step on
        "student": {"model": MODEL, "epochs": 2, "batch_size": 4, "warmup_epochs": 0},
        "search": {
            "space": str(space_path),
            "trials": 2,
            "sampler": "random",
            "initial_points": [{"student.lr": SANE_LR}, {"student.lr": WILD_LR}],
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / f"spec{seed}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def search(*args: str) -> int:
    try:
        return main(["search", *args])
    finally:
        ray.shutdown()


def test_a_finished_search_is_kept_and_a_blown_up_loss_is_diverged(tmp_path, capsys):
    original = write_spec(tmp_path)
    run = tmp_path / "runs" / "kept"
    assert search(str(original)) == 0
    out = capsys.readouterr().out
    rows = {r["param.student.lr"]: r for r in pq.read_table(run / "trials.parquet").to_pylist()}
    wild = rows[WILD_LR]
    assert rows[SANE_LR]["status"] == "complete", rows[SANE_LR]["reason"]
    assert wild["status"] == "diverged" and wild["checkpoint"] is None, (wild["status"], wild["reason"])
    assert "diverged" in wild["reason"]
    assert [r["trial_id"] for r in pq.read_table(run / "pareto.parquet").to_pylist()] == [rows[SANE_LR]["trial_id"]]
    assert "Traceback" not in out and "FAILED" not in out
    before = snapshot(run)

    # Another spec under the same name: refused, with the choices, and the run folder untouched.
    for other in (
        write_spec(tmp_path, seed=1),
        write_spec(tmp_path, seed=2, space={"student": {"lr": {"low": 1e-3, "high": 5e-3, "log": True, "step": 1e-3}}}),
    ):
        assert search(str(other)) == 2
        err = capsys.readouterr().err
        assert (
            "holds a finished search made from a different spec" in err and "--fresh" in err and "another `name`" in err
        ) or "cannot have both step and log" in err, err
        assert snapshot(run) == before

    assert main(["results", str(run)]) == 0
    assert rows[SANE_LR]["trial_id"] in capsys.readouterr().out
    # The original spec is still this folder's search: a rerun rewrites its results, keeps its trials.
    assert search(str(original)) == 0
    again = {r["param.student.lr"]: r for r in pq.read_table(run / "trials.parquet").to_pylist()}
    assert {k: (r["trial_id"], r["status"], r["map50"]) for k, r in again.items()} == {
        k: (r["trial_id"], r["status"], r["map50"]) for k, r in rows.items()
    }
