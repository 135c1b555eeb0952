"""Classification training on real Ray Train (one worker) with real AID scenes: a plain student,
then a student distilled with SSKDNet and Hinton KD from the first run's checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray
import torch
from aid_images import AID

from rkd.data.scene_dataset import validate_scene_data_spec
from rkd.train.checkpoint import KD_PARTS_FILE, STUDENT_FILE, TRAIN_STATE_FILE, load_classifier
from rkd.train.config import make_loop_config
from rkd.train.runner import ensure_ray, run_training
from rkd.train.spec import Resources

CLASSES = ["Airport", "Beach", "Forest"]
MODEL = {"kind": "classifier", "backbone": {"name": "convnet", "width": 0.25}}


@pytest.fixture(scope="module")
def ray_session():
    if not AID.is_dir():
        pytest.skip(f"AID scenes not found at {AID}")
    started = not ray.is_initialized()
    ensure_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def data_spec() -> dict:
    return validate_scene_data_spec(
        {"format": "scenes", "root": str(AID), "classes": CLASSES, "max_per_class": 4, "input_size": 64}
    )


def train(
    tmp: Path, name: str, methods: dict | None = None, teacher: str | None = None, epochs: int = 2
) -> tuple[list[dict], dict, Path]:
    cfg = {"model": MODEL, "epochs": epochs, "batch_size": 6, "lr": 3e-3, "warmup_epochs": 0.5, "grad_clip": 10.0}
    if methods:
        cfg["methods"] = methods
    rows: list[dict] = []
    outcome = run_training(
        make_loop_config(data_spec(), cfg, seed=0, threads=1, teacher_checkpoint=teacher, task="classification"),
        Resources(workers=1, cpus_per_worker=1),
        tmp / "ray",
        name,
        on_epoch=rows.append,
    )
    assert outcome.checkpoint_dir is not None
    return rows, outcome.metrics, Path(outcome.checkpoint_dir)


def test_plain_then_distilled_student(tmp_path, ray_session):
    rows, final, ckpt = train(tmp_path, "plain")
    assert [r["epoch"] for r in rows] == [1, 2] and final["epochs"] == 2 and final["epoch"] == 2
    assert 0.0 <= final["top1"] <= 1.0 and final["val_images"] == 3 * 4
    assert math.isfinite(final["gt.cls"]) and final["loss"] == pytest.approx(final["gt.cls"])
    assert not any(k.startswith("kd.") for k in final)
    student, meta = load_classifier(ckpt / STUDENT_FILE)
    assert meta["kind"] == "classifier" and meta["class_names"] == CLASSES and meta["meta"]["top1"] == final["top1"]
    assert not (ckpt / KD_PARTS_FILE).exists() and (ckpt / TRAIN_STATE_FILE).is_file()

    # The plain student (quickly trained) is the teacher of a student with SSKDNet + Hinton KD.
    methods = {"sskd": {"mask_ratio": 0.5, "patch": 2}, "hinton": {"temperature": 4.0}}
    teacher_file = ckpt / STUDENT_FILE
    rows, final, ckpt = train(tmp_path, "distilled", methods, teacher=str(teacher_file))
    kd_terms = {"kd.sskd.restore", "kd.sskd.branch_cls", "kd.sskd.distill", "kd.hinton.logits"}
    for row in rows:
        assert kd_terms | {"gt.cls", "loss", "top1"} <= set(row)
        assert all(math.isfinite(row[k]) for k in kd_terms)
        assert row["loss"] == pytest.approx(sum(row[k] for k in kd_terms | {"gt.cls"}), rel=1e-5)
    assert rows[-1]["nonfinite_steps"] == 0
    student_state = torch.load(ckpt / STUDENT_FILE, weights_only=True)["state_dict"]
    kd_parts = torch.load(ckpt / KD_PARTS_FILE, weights_only=True)
    assert not any("branch" in k for k in student_state)  # the student alone
    assert any(k.startswith("components.sskd.branch.") for k in kd_parts)
    load_classifier(ckpt / STUDENT_FILE)  # loads strictly: nothing of the KD parts leaked in
    # (Resuming is the shared loop's, tested on detection runs: tests/test_train_resume.py.)
