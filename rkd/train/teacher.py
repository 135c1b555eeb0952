"""The teacher stage: load or train the teacher once, measure it, refuse a broken one.

A silently broken teacher is the most common KD failure, so the teacher's val
mAP is always measured, recorded in ``teacher/teacher.json`` and compared with
``teacher.min_map`` before any student is distilled from it. A trained teacher
is cached by a content hash of its config and data, so re-running a search (or
another search on the same data) reuses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from rkd.data.dataset import build_dataset, dataset_fingerprint
from rkd.errors import RkdError, TeacherError
from rkd.models.flops import count_flops
from rkd.train.artifacts import collect_stage
from rkd.train.checkpoint import atomic_write_json, load_detector
from rkd.train.evaluate import evaluate
from rkd.train.loop import STUDENT_FILE, make_loop_config
from rkd.train.runner import epoch_line, run_training
from rkd.train.spec import RunSpec, config_hash


@dataclass
class TeacherReport:
    checkpoint: str
    map50: float
    gflops: float
    params: int
    source: str  # "trained", "cached" or "loaded"
    config_hash: str
    wall_s: float


def teacher_hash(spec: RunSpec) -> str:
    return config_hash("teacher", spec.data, dataset_fingerprint(spec.data), spec.teacher.to_dict(), spec.seed)


def _evaluate_file(path: Path, spec: RunSpec) -> tuple[float, float, int]:
    model, ckpt = load_detector(path)
    val_set = build_dataset(spec.data, "val", train=False)
    if ckpt["num_classes"] != len(val_set.class_names):
        raise RkdError(
            f"{path}: the teacher predicts {ckpt['num_classes']} classes but the data has "
            f"{len(val_set.class_names)} ({', '.join(val_set.class_names)})"
        )
    result = evaluate(model, val_set, len(val_set.class_names), spec.teacher.batch_size)
    flops = count_flops(model, int(spec.data["input_size"]))
    return float(result.map), float(flops.gflops), int(flops.params)


def prepare_teacher(spec: RunSpec, log: Callable[[str], None] = print) -> TeacherReport:
    """Return the teacher to distil from; raise :class:`TeacherError` if it is below ``min_map``."""
    start = time.perf_counter()
    folder = spec.run_dir / "teacher"
    record_path = folder / "teacher.json"
    digest = teacher_hash(spec)
    if spec.teacher_checkpoint is not None:
        log(f"[teacher] loading {spec.teacher_checkpoint}")
        map50, gflops, params = _evaluate_file(spec.teacher_checkpoint, spec)
        report = TeacherReport(str(spec.teacher_checkpoint), map50, gflops, params, "loaded", digest, 0.0)
    elif record_path.is_file() and json.loads(record_path.read_text()).get("config_hash") == digest:
        cached = json.loads(record_path.read_text())
        if not Path(cached["checkpoint"]).is_file():
            raise RkdError(f"{record_path}: names a missing checkpoint {cached['checkpoint']}; delete the file to retrain")
        log(f"[teacher] reusing the trained teacher in {folder} (same config and data)")
        cached["source"] = "cached"
        report = TeacherReport(**cached)
    else:
        log(f"[teacher] training {spec.teacher.epochs} epochs on {spec.resources.workers} worker(s)")
        loop_config = make_loop_config(
            spec.data, spec.teacher.to_dict(), spec.seed, spec.resources.cpus_per_worker
        )
        # The Ray run is named by the config hash: re-running after a crash resumes it.
        outcome = run_training(
        loop_config, spec.resources, spec.run_dir / "ray", f"teacher-{digest}", on_epoch=epoch_line("teacher")
    )
        collect_stage(outcome, folder)
        target = folder / "teacher.pt"
        (folder / STUDENT_FILE).replace(target)
        model, _ = load_detector(target)
        flops = count_flops(model, int(spec.data["input_size"]))
        report = TeacherReport(
            str(target), float(outcome.metrics["map50"]), float(flops.gflops), int(flops.params), "trained", digest, 0.0
        )
    report.wall_s = round(time.perf_counter() - start, 1)
    atomic_write_json(record_path, asdict(report))
    log(f"[teacher] mAP50 {report.map50:.3f}  GFLOPs {report.gflops:.3f}  ({report.source}, {report.wall_s:.0f}s)")
    if report.map50 < spec.min_map:
        raise TeacherError(
            f"the teacher's val mAP50 is {report.map50:.3f}, below teacher.min_map {spec.min_map:.3f} "
            f"({spec.source.file}:{spec.source.line('teacher.min_map')}); distilling from it would teach the "
            "students its mistakes. Train it longer (teacher.epochs), check the data, or lower teacher.min_map."
        )
    return report
