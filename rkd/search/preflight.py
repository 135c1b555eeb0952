"""Checks of a run's inputs beyond its spec's text, made before the teacher stage.

The spec and space validators see only YAML. Whatever else a run reads (its output folder, the
pixels of every image, a teacher checkpoint, the machine Ray runs on) is checked here, so bad
input stops with exit code 2 and the place named, not with a traceback after the teacher trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rkd.data.images import pixel_problems
from rkd.errors import DataError, RkdError, SpecError
from rkd.models import validate_model_spec
from rkd.train.checkpoint import read_checkpoint
from rkd.train.spec import RunSpec
from rkd.train.tasks import TASKS

SHOWN_PROBLEMS = 20  # a broken folder of thousands of images: the first ones say enough


def check_inputs(spec: RunSpec) -> list[str]:
    """Output folder, labels, image pixels and teacher checkpoint of ``spec``; raises :class:`RkdError`.
    Returns the label lines ``data.on_error: skip`` leaves out (``file:line: why``)."""
    files, skipped = TASKS[spec.task].check_data(spec.data)
    problems = pixel_problems(files)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(f"{len(problems)} image(s) of the data whose pixels do not decode:\n  {shown}{more}")
    check_teacher_checkpoint(spec)
    make_run_dir(spec)  # last: bad input leaves no folder behind
    return skipped


def make_run_dir(spec: RunSpec) -> None:
    try:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise spec.source.error(
            SpecError("output_dir", f"cannot create {spec.run_dir}: {err.strerror or err}")
        ) from None


def check_teacher_checkpoint(spec: RunSpec) -> None:
    """The teacher checkpoint reads, describes its model, holds weights that fit it and predicts the data's classes."""
    path = spec.teacher_checkpoint
    if path is None:
        return
    task = TASKS[spec.task]
    try:
        ckpt = read_checkpoint(path, task.checkpoint_kind)
        _check_description(ckpt)
        _, ckpt = task.load_model(path)
    except (RkdError, SpecError) as err:
        raise spec.source.error(SpecError("teacher.checkpoint", f"{path}: {_without_path(err, path)}")) from None
    names = task.class_names(spec.data)
    if ckpt["num_classes"] != len(names):
        raise spec.source.error(
            SpecError(
                "teacher.checkpoint",
                f"{path}: the model predicts {ckpt['num_classes']} classes, the data has {len(names)}",
            )
        )


def _check_description(ckpt: dict[str, Any]) -> None:
    if not isinstance(ckpt.get("model_spec"), dict):
        raise RkdError("has no model_spec (the description of the model its weights belong to)")
    if isinstance(ckpt.get("num_classes"), bool) or not isinstance(ckpt.get("num_classes"), int):
        raise RkdError(f"has no class count (num_classes: {ckpt.get('num_classes')!r})")
    try:
        validate_model_spec(ckpt["model_spec"])
    except SpecError as err:
        raise RkdError(f"its model_spec is not valid: {err}") from None


def _without_path(err: Exception, path: Any) -> str:
    return str(err).removeprefix(f"{path}: ")


def trials_run_here(spec: RunSpec) -> bool:
    """Whether the run's workers run on this machine (the embedded local Ray), not on a cluster."""
    import os

    return spec.resources.ray_address is None and not os.environ.get("RAY_ADDRESS")


def fill_data_caches(spec: RunSpec, log: Callable[[str], None] = print) -> None:
    """Fill the data's caches of decoded pixels once, before any trial starts, where the trials will
    read them; on a cluster each node fills its own in its first epoch (or reads a shared folder)."""
    if trials_run_here(spec):
        TASKS[spec.task].fill_caches(spec.data, log)


def check_resources(spec: RunSpec) -> None:
    """On the embedded local Ray: every worker must fit (Ray would wait for a bigger node forever)."""
    import ray

    if not trials_run_here(spec):
        return  # a cluster may add nodes on demand
    res = spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for key, per_worker, entry in (
        ("CPU", res.cpus_per_worker, "cpus_per_worker"),
        ("GPU", res.gpus_per_worker, "gpus_per_worker"),
    ):
        largest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        total = sum(n.get(key, 0.0) for n in nodes)
        if per_worker > largest:
            raise spec.source.error(
                SpecError(
                    f"resources.{entry}", f"asks {per_worker:g} {key}s per worker, but this machine has {largest:g}"
                )
            )
        if per_worker * res.workers > total:
            raise spec.source.error(
                SpecError(
                    "resources.workers",
                    f"{res.workers} workers x {per_worker:g} {key}s need {per_worker * res.workers:g}, "
                    f"but this machine has {total:g}",
                )
            )
