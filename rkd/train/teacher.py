"""The teacher stage: load or train the teacher once, measure it, refuse a broken one.

A silently broken teacher is the most common KD failure, so the teacher's val
mAP is always measured, recorded in ``teacher/teacher.json`` and compared with
``teacher.min_map`` before any student is distilled from it. A trained teacher
is cached by a content hash of its config and data, in the run folder and in rkd's
teacher cache (:mod:`rkd.train.teacher_cache`), so re-running a search, or another
search or ``rkd train`` with the same teacher and data under any name, reuses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rkd import storage
from rkd.atomic import atomic_copy
from rkd.data.fingerprint import dataset_fingerprint
from rkd.errors import RkdError, TeacherError
from rkd.models.flops import count_flops
from rkd.train import teacher_cache
from rkd.train.artifacts import collect_stage
from rkd.train.checkpoint import STUDENT_FILE, atomic_write_json, save_model
from rkd.train.config import config_hash
from rkd.train.runner import epoch_line, run_training
from rkd.train.spec import RunSpec
from rkd.train.tasks import TASKS
from rkd.train.teacher_outputs import size_line


@dataclass
class TeacherReport:
    """The teacher and its val accuracy ``score`` (``metric``: mAP50 for detectors, top-1 for classifiers)."""

    checkpoint: str
    score: float
    gflops: float
    params: int
    source: str  # "trained", "cached" or "loaded"
    config_hash: str
    wall_s: float
    metric: str = "map50"

    @property
    def map50(self) -> float:  # the detection name of the score, used all over the detection code
        return self.score

    def to_dict(self) -> dict[str, Any]:
        """As recorded in ``teacher.json`` and ``summary.json``: the score also under its metric's name."""
        return {**asdict(self), self.metric: self.score}


def shared_checkpoint(spec: RunSpec, report: TeacherReport) -> str:
    """Where every node reads the teacher from: its file, or with a storage URI output, the
    copy under ``<run>/teacher/`` there (a loaded checkpoint is uploaded once)."""
    if spec.run_uri is None:
        return report.checkpoint
    local = Path(report.checkpoint)
    name = local.name if local.parent == spec.run_dir / "teacher" else f"loaded-{report.config_hash}{local.suffix}"
    uri = storage.join(spec.run_uri, "teacher", name)
    storage.push(local, uri)
    return uri


def teacher_hash(spec: RunSpec) -> str:
    parts = ["teacher", spec.data, dataset_fingerprint(spec.data), spec.teacher.to_dict(), spec.seed]
    return config_hash(*parts, *TASKS[spec.task].teacher_hash_parts)


def prepare_teacher(spec: RunSpec, log: Callable[[str], None] = print) -> TeacherReport:
    """Return the teacher to distil from; raise :class:`TeacherError` if it is below ``min_map``."""
    start = time.perf_counter()
    task = TASKS[spec.task]
    folder = spec.run_dir / "teacher"
    record_path = folder / "teacher.json"
    remote = storage.join(spec.run_uri, "teacher") if spec.run_uri else None
    if remote:
        storage.pull(remote, folder)  # a teacher trained earlier, maybe by another machine
    digest = teacher_hash(spec)
    size = int(spec.data["input_size"])

    def loaded(path: Path) -> TeacherReport:
        """A ready checkpoint, scored on this run's val split."""
        score, model, _ = task.score_file(path, spec.data, spec.teacher.batch_size)
        flops = count_flops(model, size)
        return TeacherReport(str(path), score, flops.gflops, flops.params, "loaded", digest, 0.0, task.metric)

    if spec.teacher_checkpoint is not None:
        log(f"[teacher] loading {spec.teacher_checkpoint}")
        report = loaded(spec.teacher_checkpoint)
    elif (cached := json.loads(record_path.read_text()) if record_path.is_file() else {}).get("config_hash") == digest:
        if not Path(cached["checkpoint"]).is_file() and (folder / "teacher.pt").is_file():
            cached["checkpoint"] = str(folder / "teacher.pt")  # the run folder moved, or is a mirror
        if not Path(cached["checkpoint"]).is_file():
            raise RkdError(
                f"{record_path}: names a missing checkpoint {cached['checkpoint']}; delete the file to retrain"
            )
        log(f"[teacher] reusing the trained teacher in {folder} (same config and data)")
        fields = {k: cached[k] for k in TeacherReport.__dataclass_fields__ if k in cached}
        fields.setdefault("score", cached.get("map50"))  # teacher.json written before scores had a metric
        report = TeacherReport(**{**fields, "source": "cached"})
    elif spec.teacher.epochs > 0 and (kept := teacher_cache.lookup(digest)) is not None:
        source, record = kept
        target = folder / "teacher.pt"
        atomic_copy(source, target)
        log(
            f"[teacher] reusing the teacher trained for run {record.get('run')!r}, kept in {source.parent} "
            "(same config and data; 'rkd cache prune' frees it)"
        )
        fields = {k: record[k] for k in TeacherReport.__dataclass_fields__ if k in record}
        report = TeacherReport(**{**fields, "checkpoint": str(target), "source": "cached"})
    elif spec.teacher.epochs == 0:
        # A model trained elsewhere (an OpenMMLab checkpoint), kept as it is: saved as an rkd
        # checkpoint so every trial loads it the same way, and scored on this run's val split.
        log(f"[teacher] using {spec.teacher.model.get('checkpoint')} as it is (epochs: 0)")
        names = task.class_names(spec.data)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "teacher.pt"
        # the rkd checkpoint holds every weight: loading it must not need the original file
        saved_spec = {**spec.teacher.model, "checkpoint": None}
        save_model(
            target, task.build_model(spec.teacher.model, len(names)), saved_spec, names, size, kind=task.checkpoint_kind
        )
        report = loaded(target)
    else:
        log(f"[teacher] training {spec.teacher.epochs} epochs on {spec.resources.workers} worker(s)")
        loop_config = task.make_loop_config(
            spec.data, spec.teacher.to_dict(), spec.seed, spec.resources.cpus_per_worker
        )
        # The Ray run is named by the config hash: re-running after a crash resumes it.
        outcome = run_training(
            loop_config,
            spec.resources,
            spec.ray_storage,
            f"teacher-{digest}",
            on_epoch=epoch_line("teacher"),
            local_dir=spec.run_dir / "ray",
        )
        collect_stage(outcome, folder)
        target = folder / "teacher.pt"
        (folder / STUDENT_FILE).replace(target)
        model, _ = task.load_model(target)
        flops = count_flops(model, size)
        report = TeacherReport(
            str(target),
            float(outcome.metrics[task.metric]),
            float(flops.gflops),
            int(flops.params),
            "trained",
            digest,
            0.0,
            task.metric,
        )
    report.wall_s = round(time.perf_counter() - start, 1)
    atomic_write_json(record_path, report.to_dict())
    if report.source == "trained":  # for any later run with the same teacher, whatever its name
        teacher_cache.store(digest, Path(report.checkpoint), {**report.to_dict(), "run": spec.name})
    if remote:
        storage.push(folder, remote)
    label = task.metric_label
    log(f"[teacher] {label} {report.score:.3f}  GFLOPs {report.gflops:.3f}  ({report.source}, {report.wall_s:.0f}s)")
    if report.score < spec.min_map:
        raise TeacherError(
            f"the teacher's val {label} is {report.score:.3f}, below teacher.min_map {spec.min_map:.3f} "
            f"({spec.source.file}:{spec.source.line('teacher.min_map')}); distilling from it would teach the "
            "students its mistakes. Train it longer (teacher.epochs), check the data, or lower teacher.min_map."
        )
    return report


def announce_output_cache(spec: RunSpec, report: TeacherReport, log: Callable[[str], None] = print) -> None:
    """Say, before any student trains, what keeping the teacher's outputs (``teacher.cache: auto``)
    will take on disk and whether it fits ``teacher.cache_gb``; nothing when the cache is off."""
    task = TASKS[spec.task]
    if spec.teacher_cache.get("mode") != "auto" or not task.caches_teacher_outputs:
        return
    teacher, _ = task.load_model(Path(report.checkpoint))
    inputs = len(task.dataset(spec.data, "train", train=True))
    augment = spec.data.get("augment") or {}
    size = int(spec.data["input_size"])
    log(f"[teacher] outputs cache: {size_line(teacher, size, inputs, augment, spec.teacher_cache['limit_gb'])}")
