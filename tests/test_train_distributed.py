"""DDP over Ray Train workers: 2 workers on one machine, and 2 nodes of a real local Ray cluster;
Ray Train's in-process mode against one worker.

Each run is `rkd train` in a subprocess (its own Ray driver), reading back metrics.parquet.
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
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rkd.train.config import make_loop_config
from rkd.train.loop import train_loop
from rkd.train.spec import load_spec

pytestmark = pytest.mark.slow

NUM_TRAIN, NUM_VAL = 8, 4


def spec(out: Path, workers: int, ray_address: str | None = None) -> dict:
    model = {
        "kind": "retinanet",
        "backbone": {"name": "convnet", "width": 0.25},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    resources = {"workers": workers, "cpus_per_worker": 1}
    if ray_address:
        resources["ray_address"] = ray_address
    return {
        "name": f"ddp{workers}",
        "seed": 7,
        "data": {
            "format": "synthetic",
            "num_classes": 2,
            "num_train": NUM_TRAIN,
            "num_val": NUM_VAL,
            "input_size": 128,
        },
        # the global batch is the same (8 = 1 x 8 = 2 x 4), so the runs are comparable
        "teacher": {"model": model, "epochs": 2, "batch_size": 8 // workers, "lr": 3e-3},
        "student": {"model": model, "epochs": 1},
        "resources": resources,
        "output_dir": str(out),
    }


def train(tmp: Path, doc: dict) -> list[dict]:
    path = tmp / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # as the test cluster runs (a machine may hold an auth token)
    done = subprocess.run(
        [sys.executable, "-m", "rkd.cli", "train", str(path), "--stage", "teacher"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return pq.read_table(Path(doc["output_dir"]) / doc["name"] / "teacher" / "metrics.parquet").to_pylist()


def in_process(tmp: Path, doc: dict) -> list[dict]:
    """The loop in Ray Train's in-process mode (``num_workers=0``: no cluster, no worker process;
    Train V2 keeps no checkpoint in this mode, so it serves to debug the loop)."""
    loaded = load_spec(tmp / f"{doc['name']}.yaml")
    progress = tmp / "in_process.jsonl"
    cfg = make_loop_config(loaded.data, loaded.teacher.to_dict(), loaded.seed, threads=1, progress_file=str(progress))
    TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="in_process", storage_path=str(tmp / "in_process")),
    ).fit()
    return [json.loads(line) for line in progress.read_text().splitlines()]


def test_two_workers_see_disjoint_shards_and_score_all_val_images(tmp_path):
    one = train(tmp_path, spec(tmp_path / "runs", workers=1))
    # The same seed in one process, one thread: bit-for-bit the run of one Ray worker.
    local = in_process(tmp_path, spec(tmp_path / "runs", workers=1))
    assert [(r["epoch"], r["loss"], r["map50"]) for r in local] == [(r["epoch"], r["loss"], r["map50"]) for r in one]
    two = train(tmp_path, spec(tmp_path / "runs", workers=2))
    for row in two:
        assert row["shard_overlap"] == 0 and row["shard_unique"] == NUM_TRAIN == row["shard_total"]
    assert two[-1]["val_images"] == NUM_VAL == one[-1]["val_images"]  # every val image, not rank 0's half
    assert [r["epoch"] for r in two] == [1, 2]
    # same seed and global batch; BatchNorm statistics differ per worker, so close, not equal
    assert abs(two[-1]["map50"] - one[-1]["map50"]) <= 0.15
    assert abs(two[0]["loss"] - one[0]["loss"]) <= 0.25 * one[0]["loss"]


def test_two_node_cluster_runs_one_worker_per_node(tmp_path, two_node_ray):
    rows = train(tmp_path, spec(tmp_path / "runs", workers=2, ray_address=two_node_ray[1]))
    assert rows[-1]["nodes"] == 2  # each node has one CPU, so each ran one rank
    assert all(r["shard_overlap"] == 0 and r["shard_unique"] == NUM_TRAIN for r in rows)
    assert (tmp_path / "runs" / "ddp2" / "teacher" / "teacher.pt").is_file()  # written through the shared storage path
