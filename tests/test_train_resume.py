"""`rkd train`: SIGKILL the driver mid-run, run the same command again, and it resumes.

Real processes, a real embedded Ray in each run, real checkpoints on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

EPOCHS = 4


def spec(out: Path) -> dict:
    model = {
        "kind": "retinanet",
        "backbone": {"name": "convnet", "width": 0.25},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    return {
        "name": "resume",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 24, "num_val": 4, "input_size": 128, "seed": 1},
        "teacher": {"model": model, "epochs": EPOCHS, "batch_size": 4, "lr": 3e-3},
        "student": {"model": model, "epochs": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(out),
    }


def rkd_train(spec_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rkd.cli", "train", str(spec_path), "--stage", "teacher"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL takes the embedded Ray down too
    )


def committed_checkpoint(ray_dir: Path) -> bool:
    """True once Ray Train has recorded a checkpoint in its manager snapshot.

    A ``checkpoint_*`` folder appears before Ray commits it; a run killed in
    between has nothing to resume from, so the test must wait for the commit.
    """
    for snapshot in ray_dir.glob("teacher-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being rewritten right now
            pass
    return False


def test_sigkill_then_rerun_resumes_and_completes(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tmp_path / "runs")))
    ray_dir = tmp_path / "runs" / "resume" / "ray"

    first = rkd_train(spec_path)
    deadline = time.time() + 400
    try:
        # Wait for the first committed checkpoint, then kill everything mid-run.
        while time.time() < deadline and not committed_checkpoint(ray_dir):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        assert committed_checkpoint(ray_dir), "no checkpoint was committed in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "runs" / "resume" / "teacher" / "teacher.pt").exists()  # it really died mid-run

    second = rkd_train(spec_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    metrics = pq.read_table(tmp_path / "runs" / "resume" / "teacher" / "metrics.parquet").to_pylist()
    # every epoch exactly once, and the second run started after the first one's checkpoint
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    assert metrics[-1]["start_epoch"] >= 1
    assert metrics[0]["start_epoch"] == 0
    assert (tmp_path / "runs" / "resume" / "teacher" / "teacher.pt").is_file()
