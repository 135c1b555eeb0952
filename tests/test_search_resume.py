"""`rkd search`: SIGKILL the search mid-run, run the same command again, and it continues.

Real processes, a real embedded Ray in each run, real Tune experiment state on disk.
No completed trial is lost (it is in the final table with the metrics it had) or
repeated (its Tune result log is untouched by the second run).
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

from rkd.cli import main

pytestmark = pytest.mark.slow

TRIALS = 3
# Enough epochs that the search still runs when its first trial is recorded finished (the state is
# saved every 2 s): an epoch of this tiny model takes ~0.1 s in the trial's process, and Tune starts
# the next trial in that process at once.
EPOCHS = 30


def write_spec(tmp_path: Path, trials: int = TRIALS) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"student": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}}))
    model = {
        "kind": "retinanet",
        "backbone": {"name": "convnet", "width": 0.25},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    spec = {
        "name": "resumable",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128},
        "teacher": {"model": model, "epochs": 1, "batch_size": 4},
        "student": {"model": model, "epochs": EPOCHS, "batch_size": 4},
        "search": {"space": str(space), "trials": trials, "sampler": "random"},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rkd_search(spec_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rkd.cli", "search", str(spec_path)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL takes the embedded Ray down too
    )


def finished_trial_logs(experiment: Path) -> dict[str, str]:
    """Result logs (``result.json``) of the trials whose last line says the training finished."""
    done = {}
    for log in experiment.glob("*/result.json"):
        lines = log.read_text().splitlines()
        if lines and f'"epoch": {EPOCHS},' in lines[-1] and f'"epochs": {EPOCHS},' in lines[-1]:
            done[log.parent.name] = log.read_text()
    return done


def recorded_complete(experiment: Path) -> set[str]:
    """Ids of the trials Tune's saved experiment state records as finished (TERMINATED).

    A trial whose last epoch is in its result log but that Tune had not yet recorded as
    finished when the search was killed is still running as far as the search knows: on
    resume it continues from its last checkpoint (and reports that epoch again).
    """
    done: set[str] = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            entries = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being rewritten
        for entry in entries:
            trial = json.loads(entry[0])
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def complete_trial_logs(experiment: Path) -> dict[str, str]:
    """Result logs of the finished trials that the saved state also records as finished."""
    recorded = recorded_complete(experiment)
    return {
        name: text for name, text in finished_trial_logs(experiment).items() if name.split("_")[2] in recorded
    }  # trial folders: distill_trial_<id>_<n>_...


def test_sigkill_then_rerun_continues_without_losing_or_repeating_trials(tmp_path):
    spec_path = write_spec(tmp_path)
    run_dir = tmp_path / "runs" / "resumable"
    experiment = run_dir / "ray" / "search"

    first = rkd_search(spec_path, tmp_path / "first.log")
    deadline = time.time() + 400
    try:
        # Kill once a trial has finished and Tune's saved state records it (saved every 2 s; the
        # trial ends a few seconds after its last report, once its Train run has shut down).
        while time.time() < deadline and not complete_trial_logs(experiment):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.5)
        before = complete_trial_logs(experiment)
        assert before, "no trial finished in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (run_dir / "trials.parquet").exists()  # it really died mid-search
    assert len(before) < TRIALS, "the search finished before it could be killed"

    second = rkd_search(spec_path, tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    out = (tmp_path / "second.log").read_text()
    assert "resuming" in out
    # trials keep their numbers across the resume: the finished first one is not started again,
    # and no trial of the second process calls itself trial 1 (issue 21, item 8)
    assert f"trial 1/{TRIALS} started" not in out, out
    assert f"{TRIALS}/{TRIALS} done" in out, out

    rows = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert len(rows) == TRIALS and len(list(experiment.glob("*/result.json"))) == TRIALS
    assert all(r["status"] == "complete" for r in rows), [(r["status"], r["reason"]) for r in rows]
    after = finished_trial_logs(experiment)
    for name, text in before.items():
        assert after[name] == text  # not retrained, not re-reported


def test_a_changed_spec_is_not_resumed_silently(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    run_dir = tmp_path / "runs" / "resumable"
    # An earlier search of this name that was killed, made with a different spec.
    (run_dir / "ray" / "search").mkdir(parents=True)
    (run_dir / "ray" / "search" / "tuner.pkl").write_bytes(b"")
    (run_dir / "search_identity.json").write_text('{"seed": 123}')
    assert main(["search", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted search made from a different spec (changed: " in err and "--fresh" in err


def test_resume_without_an_interrupted_search_is_an_error(tmp_path, capsys):
    assert main(["search", str(write_spec(tmp_path)), "--resume"]) == 2
    assert "--resume: there is no interrupted search to resume in" in capsys.readouterr().err
