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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from rkd.data.dataset import class_names as data_class_names
from rkd.data.dataset import dataset_fingerprint
from rkd.models import build_detector
from rkd.models.flops import count_flops
from rkd.train.artifacts import collect_stage
from rkd.train.checkpoint import atomic_write_json
from rkd.train.loop import STUDENT_FILE, make_loop_config
from rkd.train.runner import epoch_line, run_training
from rkd.train.spec import RunSpec, config_hash
from rkd.train.teacher import TeacherReport, prepare_teacher


@dataclass
class StudentReport:
    checkpoint: str
    map50: float
    gflops: float
    params: int
    methods: list[str]
    epochs: int
    wall_s: float


def distil_student(spec: RunSpec, teacher: TeacherReport, log: Callable[[str], None] = print) -> StudentReport:
    """Distil the spec's student (with its ``student.methods``) from the teacher."""
    start = time.perf_counter()
    student = spec.student
    digest = config_hash("student", spec.data, dataset_fingerprint(spec.data), student.to_dict(), spec.seed, teacher.config_hash)
    methods = sorted(student.methods)
    log(f"[student] distilling {student.epochs} epochs with {', '.join(methods) or 'no KD (plain training)'}")
    loop_config = make_loop_config(
        spec.data,
        student.to_dict(),
        spec.seed,
        spec.resources.cpus_per_worker,
        teacher_checkpoint=teacher.checkpoint if methods else None
    )
    outcome = run_training(
        loop_config, spec.resources, spec.run_dir / "ray", f"student-{digest}", on_epoch=epoch_line("student")
    )
    folder = spec.run_dir / "student"
    collect_stage(outcome, folder)
    flops = count_flops(build_detector(student.model, len(data_class_names(spec.data))), int(spec.data["input_size"]))
    report = StudentReport(
        checkpoint=str(folder / STUDENT_FILE),
        map50=float(outcome.metrics["map50"]),
        gflops=float(flops.gflops),
        params=int(flops.params),
        methods=methods,
        epochs=int(outcome.metrics["epoch"]),
        wall_s=round(time.perf_counter() - start, 1),
    )
    atomic_write_json(folder / "student.json", asdict(report))
    log(f"[student] mAP50 {report.map50:.3f}  GFLOPs {report.gflops:.3f}  ({report.wall_s:.0f}s) -> {folder}")
    return report


def run_stages(spec: RunSpec, stages: str = "all", log: Callable[[str], None] = print) -> dict[str, Any]:
    """``rkd train``: the teacher stage, then (unless ``stages == "teacher"``) the student stage."""
    teacher = prepare_teacher(spec, log)
    out: dict[str, Any] = {"teacher": asdict(teacher)}
    if stages in ("all", "student"):
        out["student"] = asdict(distil_student(spec, teacher, log))
    log(json.dumps(out, indent=2))
    return out
