"""Ray Train checkpoints of the training loop: best-k retention, resume from the latest, torn files.

Real Ray Train runs (embedded Ray) of a tiny RetinaNet on synthetic data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch

from rkd.data.dataset import validate_data_spec
from rkd.models import validate_model_spec
from rkd.train import session
from rkd.train.checkpoint import TRAIN_STATE_FILE
from rkd.train.config import make_loop_config
from rkd.train.loop import train_loop
from rkd.train.runner import ensure_ray, run_training
from rkd.train.spec import Resources

pytestmark = pytest.mark.slow

# The interrupted loop below may run in a Ray worker, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 16},
    "head": {"convs": 1},
}
DATA = {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 2, "input_size": 64, "seed": 3}


def loop_config(**train: object) -> dict:
    settings = {
        "model": validate_model_spec(MODEL),
        "batch_size": 4,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.0,
        "grad_clip": 10.0,
        "methods": {},
        **train,
    }
    return make_loop_config(validate_data_spec(DATA), settings, seed=0, threads=1)


def interrupted_loop(cfg: dict) -> None:
    """The real loop, failing right after its ``stop_after``-th report (a crash between epochs)."""
    run = session.current()  # in this process (one CPU worker) or a Ray Train worker's
    report, count = run.report, [0]

    def report_then_fail(*args, **kwargs):
        report(*args, **kwargs)
        count[0] += 1
        if count[0] >= cfg["stop_after"]:
            raise RuntimeError("interrupted for the test")

    run.report = report_then_fail  # type: ignore[method-assign]
    with session.active(run):
        train_loop(cfg)


def checkpoint_epochs(run_dir: Path) -> list[int]:
    """The epoch of every checkpoint folder left on disk, oldest first."""
    return [
        int(torch.load(folder / TRAIN_STATE_FILE, weights_only=True)["epoch"])
        for folder in sorted(run_dir.glob("checkpoint_*"))
        if folder.is_dir()
    ]


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    ensure_ray(None, num_cpus=2)


def test_keep_best_k_keeps_the_scored_best_and_resumes_from_the_latest(tmp_path):
    cfg = loop_config(epochs=4, eval_every=2, keep=1)
    with pytest.raises(Exception, match="interrupted for the test"):
        run_training({**cfg, "stop_after": 3}, Resources(), tmp_path, "best", loop=interrupted_loop)
    # epoch 1 and 3 were not evaluated (score -1); epoch 2 was: it is the best, epoch 3 the latest.
    # Ray dropped epoch 1 but kept the unscored latest.
    assert checkpoint_epochs(tmp_path / "best") == [2, 3]

    outcome = run_training(cfg, Resources(), tmp_path, "best")
    assert outcome.metrics["start_epoch"] == 3  # the latest, not the best-scored epoch 2
    assert outcome.metrics["epoch"] == 4
    assert outcome.metrics["checkpoint_score"] == outcome.metrics["map50"]  # the last epoch is scored
    assert 4 in checkpoint_epochs(tmp_path / "best")


def test_torn_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = loop_config(epochs=3)
    first = run_training(cfg, Resources(), tmp_path, "torn")
    assert first.metrics["epoch"] == 3 and first.metrics["start_epoch"] == 0
    latest = Path(first.checkpoint_dir) / TRAIN_STATE_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a write cut short

    second = run_training(cfg, Resources(), tmp_path, "torn")
    assert second.metrics["start_epoch"] == 2  # resumed after epoch 2, then trained epoch 3 again
    assert second.metrics["epoch"] == 3
    warning = second.metrics["resume_warning"]
    assert "unreadable" in warning and TRAIN_STATE_FILE in warning and "(epoch 2)" in warning
