"""One search trial: the student a configuration describes, distilled on Ray Train.

:func:`distill_trial` is the Tune function of every trial (and of the confirm stage's trainings);
:class:`TrialContext` is what all trials of a search share, built once by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import UserCallback

from rkd.errors import RkdError
from rkd.models.flops import count_flops
from rkd.models.latency import measure_latency
from rkd.search.space import split_params
from rkd.timeline import mark
from rkd.train.runner import build_trainer, single_cpu_worker
from rkd.train.spec import Resources, TrainConfig, with_overrides
from rkd.train.tasks import TASKS


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares (:func:`rkd.search.runner.run_search` builds it once)."""

    student: TrainConfig  # the spec's student, before a trial's overrides
    base_methods: dict[str, dict[str, Any]]  # the KD methods every trial uses (the spec's own)
    data: dict[str, Any]
    num_classes: int
    task: str  # a key of rkd.train.tasks.TASKS
    input_size: int
    seed: int
    resources: Resources
    teacher_checkpoint: str  # where every node reads the teacher from (a path or a storage URI)
    max_gflops: float | None  # a student above it is infeasible, never trained
    storage: str  # where the trials' Ray Train runs keep their checkpoints
    local_storage: str  # this node's folder of them
    priors: str  # the local folder of the prior stages' results
    priors_remote: str | None  # their storage URI, for a run on shared storage
    eval_each_epoch: bool  # a scheduler or stopper compares val accuracy between epochs
    objectives: tuple[str, ...]
    teacher_cache: dict[str, Any] | None = None  # the spec's teacher.cache settings


class TrialError(RuntimeError):
    """A configuration the search produced cannot be trained; the message says why."""


def distill_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: build the student this configuration describes and distil it on Ray Train."""
    try:
        _distill_trial(config, ctx)
    except RkdError as err:
        # Tune keeps only the root cause of a chained exception; keep rkd's message instead.
        raise TrialError(f"{type(err).__module__}.{type(err).__name__}: {err}") from None


def _distill_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", f"trial-{trial_id}")
    overrides, methods = split_params(config, ctx.base_methods)
    task = TASKS[ctx.task]
    student = with_overrides(ctx.student, overrides, methods, task=task.name)
    if ctx.eval_each_epoch and student.eval_every == 0:
        student.eval_every = 1  # early stopping compares val accuracy between epochs
    flops = count_flops(task.build_model(student.model, ctx.num_classes), ctx.input_size)
    extra = {"gflops": flops.gflops, "params_m": flops.params / 1e6, "trial_id": trial_id}
    if "latency_ms" in ctx.objectives:
        # On this trial's driver CPU, batch 1, before training: a relative measure between
        # trials (noisy when trials run side by side), not the latency of the target device.
        extra["latency_ms"] = measure_latency(task.build_model(student.model, ctx.num_classes), ctx.input_size)
    if ctx.max_gflops is not None and flops.gflops > ctx.max_gflops:
        # Known before training: not worth a single step.
        tune.report({**extra, task.metric: 0.0, "epoch": 0, "epochs": student.epochs, "status": "infeasible"})
        return
    # Prior stages (DS2D2's HF amplifier): trained once, then reused from runs/<name>/priors
    # (or the run's storage URI) by every trial and `rkd train` with the same settings.
    prior_states = task.prepare_priors(
        student.methods, ctx.teacher_checkpoint, ctx.data, ctx.priors, ctx.seed, remote=ctx.priors_remote
    )
    loop_config = task.make_loop_config(
        ctx.data,
        student.to_dict(),
        ctx.seed,
        ctx.resources.cpus_per_worker,
        teacher_checkpoint=ctx.teacher_checkpoint if student.methods else None,
        extra_metrics=extra,
        prior_states=prior_states,
        teacher_cache=ctx.teacher_cache,
    )
    in_process = single_cpu_worker(ctx.resources)  # this trial holds the worker's CPUs (launcher_resources)
    trainer = build_trainer(
        loop_config,
        ctx.resources,
        ctx.storage,
        f"trial-{trial_id}",
        [tune_reporter(in_process)],
        local_dir=Path(ctx.local_storage),
        in_process=in_process,
    )
    mark("trainer_built", f"trial-{trial_id}")
    trainer.fit()


class TuneReport(UserCallback):
    """Sends an in-process trial's reports to Tune as ``TuneReportCallback`` sends those of Train
    workers: rank 0's metrics, plus the persisted checkpoint's path as ``checkpoint_path``."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

        row = dict(metrics[0])
        if checkpoint is not None:
            row[CHECKPOINT_PATH_KEY] = checkpoint.path
        tune.report(row)


def tune_reporter(in_process: bool) -> UserCallback:
    """The callback that carries a trial's epochs to Tune: directly from this process when the
    loop runs here, else Ray's from the Train controller (through a queue actor it starts)."""
    if in_process:
        return TuneReport()
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()
