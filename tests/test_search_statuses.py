"""A search whose trials complete, stop early, diverge, fail and are infeasible; it finishes anyway.

Real Ray Tune + Train and Optuna. Each trial's workers ask for every CPU of the
machine, so a placement group leaked by the trial Tune stopped early would
starve the trials after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from rkd.cli import main

pytestmark = pytest.mark.slow


def test_statuses_and_a_front_of_complete_trials_only(tmp_path):
    garbage = tmp_path / "not_weights.pt"
    garbage.write_bytes(b"this is not a state dict")
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "student": {
                    "epochs": {"choices": [1, 2]},
                    "model.backbone.width": {"choices": [0.25, 2.0]},
                    "model.backbone.weights": {"choices": [None, str(garbage)]},
                },
                "methods": {"hinton": {"weight": {"choices": [1.0, 1.0e39]}, "temperature": 2.0}},
            }
        )
    )
    model = {
        "kind": "retinanet",
        "backbone": {"name": "convnet", "width": 0.25},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    base = {
        "student.epochs": 1,
        "student.model.backbone.width": 0.25,
        "student.model.backbone.weights": None,
        "methods.hinton": False,
    }
    points = {
        "complete": base,
        "stopped": {**base, "student.epochs": 2},
        "diverged": {**base, "methods.hinton": True, "methods.hinton.weight": 1.0e39},
        "failed": {**base, "student.model.backbone.weights": str(garbage)},
        "infeasible": {**base, "student.model.backbone.width": 2.0},
    }
    spec = {
        "name": "statuses",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128},
        "teacher": {"model": model, "epochs": 1, "batch_size": 4},
        "student": {"model": model, "epochs": 1, "batch_size": 4},
        "search": {
            "space": str(space),
            "trials": len(points),
            "initial_points": list(points.values()),
            "max_gflops": 0.1,  # width 2.0 is far above
            "stop": {"after_epochs": 1, "below_map": 0.99},  # stops any trial that is not done after 1 epoch
        },
        "resources": {"workers": 1, "cpus_per_worker": os.cpu_count()},
        "output_dir": str(tmp_path / "runs"),
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    try:
        assert main(["search", str(spec_path)]) == 0
    finally:
        ray.shutdown()

    rows = pq.read_table(tmp_path / "runs" / "statuses" / "trials.parquet").to_pylist()
    assert len(rows) == len(points)

    def find(point: dict) -> dict:
        return next(r for r in rows if all(r.get(f"param.{k}") == v for k, v in point.items()))

    statuses = {name: find(point)["status"] for name, point in points.items()}
    assert statuses == {name: name for name in points}, [(r["status"], r["reason"]) for r in rows]
    assert "non-finite" in find(points["diverged"])["reason"]
    assert str(garbage) in find(points["failed"])["reason"]
    assert find(points["stopped"])["epochs_done"] == 1
    front = pq.read_table(tmp_path / "runs" / "statuses" / "pareto.parquet").to_pylist()
    assert [r["status"] for r in front] == ["complete"]
    assert Path(front[0]["checkpoint"]).is_file()
