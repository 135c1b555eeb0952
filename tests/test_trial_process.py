"""Where a search trial trains: one CPU worker in the trial's own process (no Ray Train worker
group to start), two workers on Ray Train worker actors with DDP.

Real Ray Tune + Train, each search in a subprocess (its own embedded Ray, whose processes inherit
``RKD_TIMELINE``). Processes are told apart by the pids in rkd's start-up timeline
(:mod:`rkd.timeline`): the trial function and each loop write their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN = 8


def search(tmp: Path, workers: int) -> tuple[dict[str, list[dict]], Path]:
    """A one-trial search on ``workers`` workers; returns its timeline by run name, and its run folder."""
    model = {
        "kind": "retinanet",
        "backbone": {"name": "convnet", "width": 0.25},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    doc = {
        "name": f"workers{workers}",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": NUM_TRAIN, "num_val": 4, "input_size": 128},
        "teacher": {"model": model, "epochs": 1, "batch_size": 4},
        "student": {"model": model, "epochs": 2, "batch_size": 4},
        "search": {
            "space": str(REPO / "search_spaces" / "skeleton.yaml"),
            "trials": 1,
            "initial_points": [{"methods.fitnet": False, "methods.hinton": True}],
        },
        "resources": {"workers": workers, "cpus_per_worker": 1},
        "output_dir": str(tmp / "runs"),
    }
    spec = tmp / f"{doc['name']}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    timeline = tmp / f"{doc['name']}.timeline.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RKD_TIMELINE"] = str(timeline)
    done = subprocess.run(
        [sys.executable, "-m", "rkd.cli", "search", str(spec)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs: dict[str, list[dict]] = {}
    for line in timeline.read_text().splitlines():
        row = json.loads(line)
        runs.setdefault(row["run"], []).append(row)
    return runs, tmp / "runs" / doc["name"]


def pids(rows: list[dict], event: str) -> set[int]:
    return {r["pid"] for r in rows if r["event"] == event}


def trial_runs(runs: dict[str, list[dict]]) -> list[list[dict]]:
    found = [rows for name, rows in runs.items() if name.startswith("trial-")]
    assert len(found) == 1, list(runs)
    return found


def test_a_single_worker_trial_trains_in_the_trial_process(tmp_path):
    runs, run_dir = search(tmp_path, workers=1)
    (rows,) = trial_runs(runs)
    assert pids(rows, "loop_entered") == pids(rows, "trial_start")  # no worker actor: the trial's own process
    assert len([r for r in rows if r["event"] == "epoch_end"]) == 2
    (trial,) = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert trial["status"] == "complete" and trial["epochs_done"] == 2
    assert Path(trial["checkpoint"]).is_file()  # kept by Ray Train's checkpoint manager, in the trial's run
    assert (Path(trial["checkpoint"]).parents[1] / "checkpoint_manager_snapshot.json").is_file()


def test_a_two_worker_trial_trains_on_two_ddp_workers(tmp_path):
    runs, run_dir = search(tmp_path, workers=2)
    (rows,) = trial_runs(runs)
    workers = pids(rows, "loop_entered")
    assert len(workers) == 2 and not workers & pids(rows, "trial_start")  # two Train worker actors
    (trial,) = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert trial["status"] == "complete"
    # What the two ranks trained on, gathered over torch.distributed (only a DDP run reports it).
    results = [
        json.loads(line)
        for path in (run_dir / "ray" / "search").glob("*/result.json")
        for line in path.read_text().splitlines()
    ]
    assert results and all(r["shard_total"] == NUM_TRAIN and r["shard_overlap"] == 0 for r in results)
