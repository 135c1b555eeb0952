"""``rkd search``: teacher once, then Ray Tune + Optuna trials, each a Ray Train distillation.

Every trial is a Tune function that builds a ``TorchTrainer`` for one student
configuration and calls ``fit()``; the workers' per-epoch metrics reach Tune
(and Optuna) through ``TuneReportCallback``. A trial of one CPU worker trains in
its own process instead (:mod:`rkd.train.inprocess`), with the same checkpoints
and metrics, and Tune runs the next trial in that process. Optuna optimises two objectives:
val mAP50 (max) and the student's GFLOPs at the spec's input size (min).

This module runs the stages in order (:func:`run_search`) and holds the Tune and Optuna pieces
it sets up (sampler, stopper, searcher). The ``search:`` section is read in
:mod:`rkd.search.config`, a trial's body is :mod:`rkd.search.trial`, resuming is
:mod:`rkd.search.resume`, the trials' rows :mod:`rkd.search.rows` and the files written from them
:mod:`rkd.search.summary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import optuna
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from rkd import storage
from rkd.search import confirm as confirm_stage
from rkd.search.config import first_points, load_search_space, parse_search, reference_points
from rkd.search.confirm import confirm_report
from rkd.search.headroom import headroom_line
from rkd.search.preflight import check_inputs, check_resources, fill_data_caches
from rkd.search.progress import ProgressPrinter
from rkd.search.results import OBJECTIVES, format_table, front_columns, front_rows
from rkd.search.resume import prepare_resume, start_afresh
from rkd.search.rows import collect_rows, label_references, mark_collapsed
from rkd.search.summary import record_skipped_lines, write_results
from rkd.search.trial import TrialContext, distill_trial
from rkd.train.runner import ensure_ray, launcher_resources, reuse_trial_processes
from rkd.train.spec import RunSpec
from rkd.train.tasks import TASKS
from rkd.train.teacher import announce_output_cache, prepare_teacher, shared_checkpoint


class FloorStopper(tune.Stopper):
    """Stops a trial whose val accuracy is still below ``below_map`` after ``after_epochs`` epochs."""

    def __init__(self, after_epochs: int, below_map: float, metric: str = "map50") -> None:
        self.after_epochs, self.below_map, self.metric = after_epochs, below_map, metric

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        epoch, epochs = result.get("epoch", 0), result.get("epochs", 0)
        return self.after_epochs <= epoch < epochs and result.get(self.metric, 0.0) < self.below_map

    def stop_all(self) -> bool:
        return False


class ParetoOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped early is *pruned*, not complete.

    Tune reports a stopped trial's last (truncated) metrics as its result; Optuna
    would take them as the configuration's value and bias the sampler.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get("status") != "infeasible" and result.get("epoch") != result.get("epochs"):
            result = None  # no value + no error = PRUNED in OptunaSearch
        super().on_trial_complete(trial_id, result=result, error=error)


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        # A small population suits the small budgets of distillation searches.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, trials // 3)))
    if name == "gp":
        # Gaussian-process BO: the most sample-efficient for a handful of continuous knobs; a
        # parameter that exists only in some configurations is sampled independently.
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=max(2, min(10, trials // 3)), warn_independent_sampling=False
        )
    # Conditional spaces need the joint (multivariate, grouped) TPE.
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=max(2, min(10, trials // 3))
    )


def run_search(spec: RunSpec, log: Callable[[str], None] = print, resume: str = "auto") -> dict[str, Any]:
    """Run the whole search for ``spec``; returns the summary written to ``summary.json``.

    ``resume``: ``auto`` continues an interrupted search of the same spec (``ray/search``
    exists), ``resume`` insists on it, ``fresh`` discards it and starts over.
    """
    start = time.perf_counter()
    search = parse_search(spec)
    space = load_search_space(spec, search)
    # Read every label file and decode every image now: a line that does not parse must fail
    # here, with its file:line, not inside a Ray worker after the teacher has trained.
    record_skipped_lines(spec, check_inputs(spec), log)
    if spec.run_uri:  # what an earlier run left there: its identity, teacher, priors, results
        storage.pull(spec.run_uri, spec.run_dir, exclude=("ray",))
    resuming = prepare_resume(spec, search, resume)
    # Tune saves the experiment's state (trials, searcher) at most this often; a search
    # killed between two saves redoes at most what happened since the last one.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # A trial that fails gets one line with its reason (ProgressPrinter), not Tune's traceback.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    ensure_ray(spec.resources.ray_address)
    check_resources(spec)
    fill_data_caches(spec, log)  # last before training: a bad setup fails before a long fill
    teacher = prepare_teacher(spec, log)
    if space.methods() or spec.student.methods:  # some trial distils: it reads the teacher's outputs
        announce_output_cache(spec, teacher, log)

    ctx = TrialContext(
        student=spec.student,
        base_methods=spec.student.methods,
        data=spec.data,
        num_classes=len(TASKS[spec.task].class_names(spec.data)),
        task=spec.task,
        input_size=int(spec.data["input_size"]),
        seed=spec.seed,
        resources=spec.resources,
        teacher_checkpoint=shared_checkpoint(spec, teacher),
        teacher_cache=spec.teacher_cache,
        max_gflops=search.max_gflops,
        storage=storage.join(spec.ray_storage, "trials"),
        local_storage=str(spec.run_dir / "ray" / "trials"),
        priors=str(spec.run_dir / "priors"),
        priors_remote=storage.join(spec.run_uri, "priors") if spec.run_uri else None,
        eval_each_epoch=search.scheduler is not None or search.stop is not None,
        objectives=search.objectives,
    )
    searcher = ParetoOptunaSearch(
        space=space.define_by_run,
        metric=list(search.objectives),
        mode=["max" if OBJECTIVES[o] else "min" for o in search.objectives],
        sampler=make_sampler(search.sampler, search.seed, search.trials),
        points_to_evaluate=first_points(space, search, spec.student),
    )
    limited = ConcurrencyLimiter(searcher, max_concurrent=spec.resources.max_concurrent_trials)
    trainable = tune.with_resources(tune.with_parameters(distill_trial, ctx=ctx), launcher_resources(spec.resources))
    scheduler = None
    if search.scheduler is not None:
        # Multi-fidelity on val mAP50: trials are compared at epochs grace, grace*rf, ...
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch",
            metric=search.objectives[0],
            mode="max",
            max_t=spec.student.epochs,
            grace_period=search.scheduler["grace_period"],
            reduction_factor=search.scheduler["reduction_factor"],
        )
    experiment = storage.join(spec.ray_storage, "search")
    if resuming:
        log(f"[search] resuming {experiment}: finished trials are kept, unfinished ones continue")
        # Completed and failed trials keep their results; a trial that was running resumes
        # its Train run from that run's last checkpoint. The searcher (Optuna study) and the
        # scheduler come back from the experiment's own checkpoint.
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
    else:
        start_afresh(spec, search)
        log(f"[search] {search.trials} trials, sampler {search.sampler}, space {search.space_path.name}")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=limited,
                num_samples=search.trials,
                scheduler=scheduler,
                reuse_actors=reuse_trial_processes(spec.resources),
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=spec.ray_storage,
                callbacks=[ProgressPrinter(search.trials, metric=search.objectives[0])],
                stop=FloorStopper(**search.stop, metric=search.objectives[0]) if search.stop else None,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    if spec.run_uri:  # the trials' result files, read for the curves and the report
        storage.pull(experiment, spec.run_dir / "ray" / "search")
    rows = collect_rows(grid, spec.ray_storage if spec.run_uri else None)
    label_references(rows, reference_points(space, search))
    mark_collapsed(rows, search.objectives[0])
    summary = write_results(spec, rows, teacher.to_dict(), time.perf_counter() - start, search.objectives)
    confirmed = None
    if search.confirm is not None:
        # The search's results are written first: a confirm stage that is interrupted loses none of them.
        confirmed = confirm_stage.run_confirm(spec, search.confirm, rows, search.objectives, ctx, log)
        summary = write_results(
            spec, rows, teacher.to_dict(), time.perf_counter() - start, search.objectives, confirmed
        )
    if spec.run_uri:
        storage.push(spec.run_dir, spec.run_uri, exclude=("ray",))
    front = front_rows(rows, search.objectives)
    log("")
    log(
        f"Pareto front of {spec.name}: {len(front)} of {len(rows)} trials (teacher {TASKS[spec.task].metric_label} {teacher.score:.3f}, "
        f"{teacher.gflops:.3f} GFLOPs)"
    )
    log(format_table(front, front_columns(search.objectives)) if front else "(no complete trial: nothing on the front)")
    if summary["teacher_headroom"] is not None:
        log(headroom_line(summary["teacher_headroom"]))
    if confirmed is not None:
        log(confirm_report(confirmed))
    log(
        f"\nresults in {spec.run_uri or spec.run_dir}: trials.parquet, pareto.parquet, pareto.png, summary.json "
        f"({summary['wall_s']:.0f}s)"
    )
    return summary
