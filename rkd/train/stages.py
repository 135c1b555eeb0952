"""Training stages of ``rkd train``: the teacher, then one distilled student.

Each stage runs the same Ray Train loop as the search's trials. A stage's
final checkpoint files are copied atomically into ``runs/<name>/<stage>/``
with ``metrics.parquet`` (one row per epoch, every loss term apart). Running
the same command again after a crash continues from the stage's last Ray
checkpoint, because the stage's Ray run name is a content hash of its config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rkd import storage
from rkd.data.fingerprint import dataset_fingerprint
from rkd.models.flops import count_flops
from rkd.train.artifacts import collect_stage
from rkd.train.checkpoint import STUDENT_FILE, atomic_write_json
from rkd.train.config import config_hash
from rkd.train.runner import epoch_line, run_training
from rkd.train.spec import RunSpec
from rkd.train.tasks import TASKS
from rkd.train.teacher import TeacherReport, announce_output_cache, prepare_teacher, shared_checkpoint


@dataclass
class StudentReport:
    checkpoint: str
    score: float  # val accuracy: mAP50 for detectors, top-1 for classifiers (``metric``)
    gflops: float
    params: int
    methods: list[str]
    epochs: int
    wall_s: float
    metric: str = "map50"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), self.metric: self.score}


def distil_student(spec: RunSpec, teacher: TeacherReport, log: Callable[[str], None] = print) -> StudentReport:
    """Distil the spec's student (with its ``student.methods``) from the teacher."""
    start = time.perf_counter()
    task = TASKS[spec.task]
    student = spec.student
    digest = config_hash(
        "student", spec.data, dataset_fingerprint(spec.data), student.to_dict(), spec.seed, teacher.config_hash
    )
    methods = sorted(student.methods)
    teacher_path = shared_checkpoint(spec, teacher)
    log(f"[student] distilling {student.epochs} epochs with {', '.join(methods) or 'no KD (plain training)'}")
    if methods:
        announce_output_cache(spec, teacher, log)
    # Prior stages of KD methods (DS2D2's HF amplifier) train once on the teacher; cached in runs/<name>/priors.
    prior_states = task.prepare_priors(
        student.methods,
        teacher_path,
        spec.data,
        spec.run_dir / "priors",
        spec.seed,
        log,
        remote=storage.join(spec.run_uri, "priors") if spec.run_uri else None,
    )
    loop_config = task.make_loop_config(
        spec.data,
        student.to_dict(),
        spec.seed,
        spec.resources.cpus_per_worker,
        teacher_checkpoint=teacher_path if methods else None,
        prior_states=prior_states,
        teacher_cache=spec.teacher_cache,
    )
    outcome = run_training(
        loop_config,
        spec.resources,
        spec.ray_storage,
        f"student-{digest}",
        on_epoch=epoch_line("student"),
        local_dir=spec.run_dir / "ray",
    )
    folder = spec.run_dir / "student"
    collect_stage(outcome, folder)
    flops = count_flops(task.build_model(student.model, len(task.class_names(spec.data))), int(spec.data["input_size"]))
    report = StudentReport(
        checkpoint=str(folder / STUDENT_FILE),
        score=float(outcome.metrics[task.metric]),
        gflops=float(flops.gflops),
        params=int(flops.params),
        methods=methods,
        epochs=int(outcome.metrics["epoch"]),
        wall_s=round(time.perf_counter() - start, 1),
        metric=task.metric,
    )
    atomic_write_json(folder / "student.json", report.to_dict())
    if spec.run_uri:
        storage.push(folder, storage.join(spec.run_uri, "student"))
    log(
        f"[student] {task.metric_label} {report.score:.3f}  GFLOPs {report.gflops:.3f}  ({report.wall_s:.0f}s) -> {folder}"
    )
    return report


def run_stages(spec: RunSpec, stages: str = "all", log: Callable[[str], None] = print) -> dict[str, Any]:
    """``rkd train``: the teacher stage, then (unless ``stages == "teacher"``) the student stage."""
    teacher = prepare_teacher(spec, log)
    out: dict[str, Any] = {"teacher": teacher.to_dict()}
    if stages in ("all", "student"):
        out["student"] = distil_student(spec, teacher, log).to_dict()
    log(json.dumps(out, indent=2))
    return out
