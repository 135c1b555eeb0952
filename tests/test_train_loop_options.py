"""Loop settings of issue 7: precision, schedules, lr scaling, channels_last, logging, determinism.

Spec validation runs without Ray; the rest are real Ray Train runs (embedded Ray) of a tiny
RetinaNet on synthetic data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rkd.data.dataset import validate_data_spec
from rkd.distill.distiller import validate_methods
from rkd.errors import SpecError
from rkd.models import validate_model_spec
from rkd.schema import Section
from rkd.train.artifacts import read_history
from rkd.train.checkpoint import STUDENT_FILE
from rkd.train.config import config_hash, make_loop_config
from rkd.train.runner import ensure_ray, run_training
from rkd.train.spec import TRAIN_KEYS, _train_config

MODEL = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 16},
    "head": {"convs": 1},
}
DATA = {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 2, "input_size": 64, "seed": 5}


def train_config(**given: object):
    return _train_config(Section({"model": MODEL, **given}, "teacher"), TRAIN_KEYS, {"epochs": 3, "lr": 1e-3})


@pytest.mark.parametrize(
    ("given", "path", "words"),
    [
        ({"precision": "fp16"}, "teacher.precision", "expected one of"),
        ({"schedule": "step"}, "teacher.step_epochs", "is required with schedule: step"),
        ({"step_epochs": [3, 2]}, "teacher.step_epochs", "increasing"),
        ({"step_gamma": 2}, "teacher.step_gamma", "<= 1"),
        ({"lr_reference_batch": 0}, "teacher.lr_reference_batch", ">= 1"),
        ({"channels_last": "yes"}, "teacher.channels_last", "auto, true or false"),
        ({"keep": -1}, "teacher.keep", ">= 0"),
        ({"logging": {"wandb": True}}, "teacher.logging.wandb", "unknown key"),
    ],
)
def test_bad_loop_settings_name_their_entry(given, path, words):
    with pytest.raises(SpecError) as err:
        train_config(**given)
    assert err.value.path == path and words in err.value.message


def test_a_logger_that_is_not_installed_is_refused_by_name():
    pytest.importorskip("tensorboardX")
    assert train_config(logging={"tensorboard": True}).logging == {"tensorboard": True}
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(SpecError, match=r"teacher\.logging\.mlflow: needs the 'mlflow' package"):
            train_config(logging={"mlflow": True})


def test_defaults_keep_the_old_behaviour_and_settings_enter_the_stage_hash():
    plain = train_config()
    assert (plain.precision, plain.schedule, plain.lr_reference_batch, plain.channels_last, plain.keep) == (
        "auto",
        "cosine",
        None,
        "auto",
        0,
    )
    assert config_hash(plain.to_dict()) != config_hash(train_config(precision="fp32").to_dict())
    assert config_hash(plain.to_dict()) != config_hash(train_config(schedule="step", step_epochs=[2]).to_dict())


def loop_config(teacher_checkpoint: str | None = None, **train: object) -> dict:
    settings = {
        "model": validate_model_spec(MODEL),
        "batch_size": 4,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.0,
        "grad_clip": 10.0,
        "eval_every": 0,
        "methods": {},
        **train,
    }
    return make_loop_config(
        validate_data_spec(DATA), settings, seed=11, threads=1, teacher_checkpoint=teacher_checkpoint
    )


@pytest.fixture(scope="module")
def embedded_ray():
    ensure_ray(None, num_cpus=2)


def student_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint_dir) / STUDENT_FILE, weights_only=True)["state_dict"]


LOSS_KEYS = ("loss", "gt.cls", "gt.box", "lr", "map50")


@pytest.mark.slow
def test_a_seeded_single_worker_cpu_run_repeats_bit_for_bit(tmp_path, embedded_ray):
    runs = [run_training(loop_config(epochs=2), _resources(), tmp_path, f"repeat{i}") for i in range(2)]
    first, second = (student_state(r.checkpoint_dir) for r in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    losses = [[{k: row[k] for k in LOSS_KEYS} for row in read_history(r.checkpoint_dir)] for r in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.slow
def test_step_schedule_scaled_lr_bf16_channels_last_kd_tensorboard_and_mlflow(tmp_path, embedded_ray, monkeypatch):
    # lr 1e-3 is given for 2 images a step; this run steps 4: base lr 2e-3. 2 steps an epoch,
    # the lr drops by half after epoch 2.
    mlflow = pytest.importorskip("mlflow")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    cfg = loop_config(
        epochs=3,
        schedule="step",
        step_epochs=[2],
        step_gamma=0.5,
        lr_reference_batch=2,
        logging={"tensorboard": True, "mlflow": True},
    )
    teacher = run_training(cfg, _resources(), tmp_path, "stepped")
    rows = read_history(teacher.checkpoint_dir)
    assert [r["base_lr"] for r in rows] == [pytest.approx(2e-3)] * 3
    assert [r["lr"] for r in rows] == [pytest.approx(2e-3), pytest.approx(1e-3), pytest.approx(1e-3)]
    assert rows[0]["precision"] == "float32" and rows[0]["channels_last"] == 0  # auto on CPU
    events = list((tmp_path / "stepped" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # one MLflow run named after the training run, each epoch's metrics at its epoch
    client = mlflow.tracking.MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs] == ["stepped"]
    history = client.get_metric_history(runs[0].info.run_id, "lr")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, pytest.approx(2e-3)),
        (2, pytest.approx(1e-3)),
        (3, pytest.approx(1e-3)),
    ]
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 3

    # bf16 autocast forced on CPU, NHWC, and a KD method with the frozen teacher under the same autocast
    kd = loop_config(
        teacher_checkpoint=str(Path(teacher.checkpoint_dir) / STUDENT_FILE),
        epochs=1,
        precision="bf16",
        channels_last=True,
        methods=validate_methods({"fitnet": None}),
    )
    rows = read_history(run_training(kd, _resources(), tmp_path, "bf16").checkpoint_dir)
    assert rows[0]["precision"] == "bfloat16" and rows[0]["channels_last"] == 1
    kd_terms = [k for k in rows[0] if k.startswith("kd.")]
    assert kd_terms and all(torch.isfinite(torch.tensor(rows[0][k])) for k in kd_terms)
    assert rows[0]["nonfinite_steps"] == 0


def _resources():
    from rkd.train.spec import Resources

    return Resources(workers=1, cpus_per_worker=1)
