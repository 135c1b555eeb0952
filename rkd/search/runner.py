"""``rkd search``: teacher once, then Ray Tune + Optuna trials, each a Ray Train distillation.

Every trial is a Tune function that builds a ``TorchTrainer`` for one student
configuration and calls ``fit()``; the workers' per-epoch metrics reach Tune
(and Optuna) through ``TuneReportCallback``. A trial of one CPU worker trains in
its own process instead (:mod:`rkd.train.inprocess`), with the same checkpoints
and metrics, and Tune runs the next trial in that process. Optuna optimises two objectives:
val mAP50 (max) and the student's GFLOPs at the spec's input size (min).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from ray import tune
from ray.train import UserCallback
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from rkd import storage
from rkd.data.dataset import SKIPPED_FILE, write_skipped
from rkd.errors import RkdError, SpecError
from rkd.models.flops import count_flops
from rkd.models.latency import measure_latency
from rkd.schema import Section, join
from rkd.search import confirm as confirm_stage
from rkd.search.confirm import confirm_report, parse_confirm
from rkd.search.preflight import check_inputs, check_resources
from rkd.search.progress import ProgressPrinter
from rkd.search.results import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    hypervolume_of,
    front_rows,
    error_reason,
    loss_growth,
    knee,
    format_table,
    plot_front,
    trials_table,
    write_parquet,
)
from rkd.search.space import SearchSpace, load_space, split_params
from rkd.timeline import mark
from rkd.train.checkpoint import atomic_write_json
from rkd.train.loop import STUDENT_FILE
from rkd.train.runner import build_trainer, ensure_ray, launcher_resources, reuse_trial_processes, single_cpu_worker
from rkd.train.spec import RunSpec, with_overrides
from rkd.metrics import metric_label
from rkd.train.tasks import TASKS
from rkd.train.teacher import prepare_teacher, shared_checkpoint

SEARCH_KEYS = {
    "space", "trials", "seed", "sampler", "objectives", "max_gflops", "initial_points", "published_defaults",
    "scheduler", "stop", "confirm",
}
SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass
class SearchConfig:
    space_path: Path
    trials: int
    seed: int
    sampler: str
    objectives: tuple[str, ...]  # the task's accuracy (map50 or top1) and gflops, optionally latency_ms
    max_gflops: float | None
    initial_points: list[dict[str, Any]]
    published_defaults: bool  # also try each method of the space alone at its published defaults
    scheduler: dict[str, Any] | None  # {kind: asha, grace_period, reduction_factor}
    stop: dict[str, Any] | None  # {after_epochs, below_map}
    confirm: dict[str, int] | None = None  # {top, seeds}: see rkd.search.confirm


def parse_search(spec: RunSpec) -> SearchConfig:
    sec = Section(spec.search, "search")
    sec.reject_unknown(SEARCH_KEYS)
    try:
        return SearchConfig(
            space_path=sec.file_path("space", spec.spec_path.parent),
            trials=sec.int("trials", 8, low=1),
            seed=sec.int("seed", spec.seed, low=0),
            sampler=sec.str("sampler", "tpe", choices=list(SAMPLERS)),
            objectives=_objectives(sec, TASKS[spec.task].metric),
            max_gflops=sec.float("max_gflops", None, low=0.0) if sec.raw("max_gflops", None) is not None else None,
            initial_points=sec.raw("initial_points", []),
            published_defaults=sec.bool("published_defaults", False),
            scheduler=_scheduler(sec.section("scheduler")) if sec.raw("scheduler", None) is not None else None,
            stop=_stop(sec.section("stop")) if sec.raw("stop", None) is not None else None,
            confirm=parse_confirm(sec.section("confirm")) if sec.raw("confirm", None) is not None else None,
        )
    except SpecError as err:
        raise spec.source.error(err) from None


def _objectives(sec: Section, accuracy: str) -> tuple[str, ...]:
    given = sec.raw("objectives", [accuracy, "gflops"])
    if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
        raise SpecError(join(sec.path, "objectives"), f"expected a list of objective names, got {given!r}")
    if len(set(given)) != len(given) or not {accuracy, "gflops"} <= set(given) <= {accuracy, "gflops", "latency_ms"}:
        raise SpecError(
            join(sec.path, "objectives"),
            f"expected {accuracy} and gflops, optionally latency_ms, each once; got {given!r}",
        )
    return (accuracy, *[o for o in given if o != accuracy])  # the accuracy first: the front's y axis


def _scheduler(sec: Section) -> dict[str, Any]:
    sec.reject_unknown({"kind", "grace_period", "reduction_factor"})
    return {
        "kind": sec.str("kind", "asha", choices=["asha"]),
        "grace_period": sec.int("grace_period", 1, low=1),
        "reduction_factor": sec.float("reduction_factor", 2.0, low=1.01),
    }


def _stop(sec: Section) -> dict[str, Any]:
    sec.reject_unknown({"after_epochs", "below_map"})
    return {"after_epochs": sec.int("after_epochs", low=1), "below_map": sec.float("below_map", low=0.0, high=1.0)}


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


def load_search_space(spec: RunSpec, search: SearchConfig) -> SearchSpace:
    """Compile the space, checking every student value it can produce against the spec."""
    space = load_space(
        search.space_path,
        student_check=lambda overrides: with_overrides(spec.student, overrides, task=spec.task),
        registry=TASKS[spec.task].method_registry(),
    )
    if search.published_defaults:
        space = space.with_published_choices()  # the published points run the published configuration as it is
    if not isinstance(search.initial_points, list):
        raise spec.source.error(SpecError("search.initial_points", "expected a list of {parameter: value} mappings"))
    dims = {d.name: d for d in space.dims}
    for i, point in enumerate(search.initial_points):
        where = f"search.initial_points.{i}"
        if not isinstance(point, dict):
            raise spec.source.error(SpecError(where, f"expected a mapping of parameter names to values, got {point!r}"))
        for key, value in point.items():
            if key not in dims:
                raise spec.source.error(SpecError(f"{where}.{key}", f"not a parameter of the space; it has {sorted(dims)}"))
            if not dims[key].admits(value):  # Optuna would fail on it after the teacher stage
                raise spec.source.error(SpecError(
                    f"{where}.{key}", f"{value!r} is outside the space's {dims[key].describe()} ({search.space_path.name})"
                ))
    return space


def reference_points(space: SearchSpace, search: SearchConfig) -> dict[str, dict[str, Any]]:
    """Named configurations every user wants to compare with: the student without KD and, with
    ``published_defaults``, each method of the space alone at its published defaults."""
    points = {"no KD": space.baseline_point()} if space.baseline_point() else {}
    if search.published_defaults:
        points.update({f"{m} defaults": p for m, p in space.published_default_points().items()})
    return points


def first_points(space: SearchSpace, search: SearchConfig) -> list[dict[str, Any]] | None:
    """Configurations tried first: the user's, else the reference points."""
    if search.initial_points:
        points = [dict(p) for p in search.initial_points]
        if search.published_defaults:
            points += list(reference_points(space, search).values())[1:]
    else:
        points = list(reference_points(space, search).values())
    return points[: search.trials] or None


def label_references(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> None:
    """Set ``reference`` on the rows whose configuration is one of the named reference points."""
    for row in rows:
        params = row.get("params") or {}
        row["reference"] = next(
            (name for name, point in references.items() if all(params.get(k) == v for k, v in point.items())), None
        )


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


class TrialError(RuntimeError):
    """A configuration the search produced cannot be trained; the message says why."""


def distill_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: build the student this configuration describes and distil it on Ray Train."""
    try:
        _distill_trial(config, ctx)
    except RkdError as err:
        # Tune keeps only the root cause of a chained exception; keep rkd's message instead.
        raise TrialError(f"{type(err).__module__}.{type(err).__name__}: {err}") from None


def _distill_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", f"trial-{trial_id}")
    overrides, methods = split_params(config, ctx["base_methods"])
    task = TASKS[ctx["task"]]
    student = with_overrides(ctx["student"], overrides, methods, task=task.name)
    if ctx["eval_each_epoch"] and student.eval_every == 0:
        student.eval_every = 1  # early stopping compares val accuracy between epochs
    flops = count_flops(task.build_model(student.model, ctx["num_classes"]), ctx["input_size"])
    extra = {"gflops": flops.gflops, "params_m": flops.params / 1e6, "trial_id": trial_id}
    if "latency_ms" in ctx["objectives"]:
        # On this trial's driver CPU, batch 1, before training: a relative measure between
        # trials (noisy when trials run side by side), not the latency of the target device.
        extra["latency_ms"] = measure_latency(task.build_model(student.model, ctx["num_classes"]), ctx["input_size"])
    if ctx["max_gflops"] is not None and flops.gflops > ctx["max_gflops"]:
        # Known before training: not worth a single step.
        tune.report({**extra, task.metric: 0.0, "epoch": 0, "epochs": student.epochs, "status": "infeasible"})
        return
    prior: dict[str, Any] = {}
    if task.name == "detection":
        from rkd.train.prior import prepare_priors

        # Prior stages (DS2D2's HF amplifier): trained once, then reused from runs/<name>/priors
        # (or the run's storage URI) by every trial and `rkd train` with the same settings.
        priors = prepare_priors(student.methods, ctx["teacher_checkpoint"], ctx["data"], ctx["priors"], ctx["seed"],
                                remote=ctx["priors_remote"])
        prior["prior_states"] = {name: result.path for name, result in priors.items()}
    loop_config = task.make_loop_config(
        ctx["data"],
        student.to_dict(),
        ctx["seed"],
        ctx["resources"].cpus_per_worker,
        teacher_checkpoint=ctx["teacher_checkpoint"] if student.methods else None,
        extra_metrics=extra,
        **prior,
    )
    in_process = single_cpu_worker(ctx["resources"])  # this trial holds the worker's CPUs (launcher_resources)
    trainer = build_trainer(
        loop_config, ctx["resources"], ctx["storage"], f"trial-{trial_id}", [tune_reporter(in_process)],
        loop=task.loop, local_dir=Path(ctx["local_storage"]), in_process=in_process,
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


def _status(result: Any) -> tuple[str, str | None]:
    metrics = result.metrics or {}
    if result.error is not None:
        reason = error_reason(f"{type(result.error).__name__}: {result.error}")
        return ("diverged" if "DivergenceError" in reason else "failed"), reason
    if metrics.get("status") == "infeasible":
        return "infeasible", "GFLOPs above search.max_gflops"
    if metrics.get("epochs") and metrics.get("epoch") == metrics.get("epochs"):
        grown = loss_growth(metrics)
        if grown is not None:
            return "diverged", grown
        return "complete", metrics.get("kd_warning")  # e.g. published KD weights that swamped the task loss
    return "stopped", f"stopped after {metrics.get('epoch', 0)} of {metrics.get('epochs', '?')} epochs"


def mark_collapsed(rows: list[dict[str, Any]], accuracy: str) -> None:
    """A trained trial scoring 0 where the student without KD scores above it did not learn: diverged."""
    reference = next((r for r in rows if r.get("reference") == "no KD" and r["status"] == "complete"), None)
    if reference is None or not (reference.get(accuracy) or 0) > 0:
        return
    for row in rows:
        if row["status"] == "complete" and row.get(accuracy) == 0:
            row.update(status="diverged", checkpoint=None, reason=(
                f"diverged: val {metric_label(accuracy)} 0 after training, the no-KD reference "
                f"{reference['trial_id']} reaches {reference[accuracy]:.3f}"))


def collect_rows(grid: Any, storage_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per trial. ``storage_uri``: the Ray storage URI, so checkpoint paths are recorded as URIs."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        status, reason = _status(result)
        params = dict(result.config or {})
        methods = [k.split(".")[1] for k, v in params.items() if k.startswith("methods.") and k.count(".") == 1 and v]
        checkpoint = metrics.get("checkpoint_path")
        if checkpoint and storage_uri:
            checkpoint = storage.to_uri(storage_uri, checkpoint)
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "status": status,
                "reason": reason,
                "map50": _num(metrics.get("map50")),
                "top1": _num(metrics.get("top1")),
                "gflops": _num(metrics.get("gflops")),
                "latency_ms": _num(metrics.get("latency_ms")),
                "params_m": _num(metrics.get("params_m")),
                "epochs_done": metrics.get("epoch"),
                "epochs": metrics.get("epochs"),
                "kd_methods": ",".join(sorted(methods)),
                "wall_s": _num(metrics.get("time_total_s")),
                "checkpoint": storage.join(checkpoint, STUDENT_FILE) if checkpoint and status == "complete" else None,
                "config_json": json.dumps(params, sort_keys=True, default=str),
                "params": params,
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


FRONT_COLUMNS = [
    ("trial_id", "trial"),
    ("map50", "mAP50"),
    ("gflops", "GFLOPs"),
    ("params_m", "params(M)"),
    ("kd_methods", "KD methods"),
    ("checkpoint", "checkpoint"),
]


def front_columns(objectives: tuple[str, ...]) -> list[tuple[str, str]]:
    columns = list(FRONT_COLUMNS)
    columns[1] = (objectives[0], metric_label(objectives[0]))  # the task's accuracy
    if "latency_ms" in objectives:
        columns.insert(3, ("latency_ms", "latency(ms)"))
    return columns


def write_results(
    spec: RunSpec,
    rows: list[dict[str, Any]],
    teacher: dict[str, Any],
    wall_s: float,
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES,
    confirm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run's tables, plot and summary; ``confirm``: the confirm stage's results, once there are any."""
    run_dir = spec.run_dir
    front = front_rows(rows, objectives)
    write_parquet(trials_table(rows), run_dir / "trials.parquet")
    write_parquet(trials_table(front), run_dir / "pareto.parquet")
    latency = "latency_ms" in objectives
    plot_front(rows, front, run_dir / "pareto.png", teacher, f"rkd search: {spec.name}", latency=latency,
               accuracy=objectives[0], confirmed=(confirm or {}).get("points"))
    # Reference point: no accuracy, 10% above the largest cost seen (the teacher's GFLOPs included).
    ref = {objectives[0]: 0.0}
    for key in objectives[1:]:
        seen = [r[key] for r in rows if r.get(key) is not None] + ([teacher[key]] if teacher.get(key) else [])
        ref[key] = max(seen, default=1.0) * 1.1
    ref_point = [ref[k] for k in objectives]
    summary = {
        "name": spec.name,
        "teacher": teacher,
        "objectives": list(objectives),
        "trials": len(rows),
        "status_counts": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "front": [r["trial_id"] for r in front],
        "knee": (knee(front, objectives[0]) or {}).get("trial_id"),
        "hypervolume": hypervolume_of(rows, objectives, ref_point),
        "hypervolume_ref": ref_point,
        "wall_s": round(wall_s, 1),
        "skipped_lines": count_skipped_lines(run_dir),
        **({"confirm": confirm} if confirm is not None else {}),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def record_skipped_lines(spec: RunSpec, lines: list[str], log: Callable[[str], None]) -> list[str]:
    """The label ``lines`` ``data.on_error: skip`` left out (:func:`check_inputs`), listed in
    ``<run>/skipped_lines.txt`` (file:line: why) and counted in ``summary.json``; a list of an earlier
    run of this name is replaced."""
    (spec.run_dir / SKIPPED_FILE).unlink(missing_ok=True)
    if write_skipped(lines, spec.run_dir):
        log(f"[data] {len(lines)} label line(s) skipped (data.on_error: skip); listed in {spec.run_dir / SKIPPED_FILE}")
    return lines


def count_skipped_lines(run_dir: Path) -> int:
    path = Path(run_dir) / SKIPPED_FILE
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


SEARCH_IDENTITY_FILE = "search_identity.json"
RESULT_FILES = ("summary.json", "trials.parquet", "pareto.parquet", "pareto.png", "report.html")


def search_identity(spec: RunSpec, search: SearchConfig) -> dict[str, Any]:
    """What makes two searches the same search: a rerun resumes only an identical one."""
    identity = {
        "data": spec.data,
        "teacher": spec.teacher.to_dict(),
        "student": spec.student.to_dict(),
        "seed": spec.seed,
        # The confirm stage keeps its own record of what it trained (rkd.search.confirm): changing
        # it re-trains only what it lacks, never the search.
        "search": {k: v for k, v in asdict(search).items() if k not in ("space_path", "confirm")},
        "space": search.space_path.read_text(),
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from the file


def prepare_resume(spec: RunSpec, search: SearchConfig, mode: str) -> bool:
    """Decide whether this run continues an earlier one of the same name (``mode``: auto, resume, fresh).

    Returns True to resume. A search of the same spec is resumed: an interrupted one
    continues, a finished one just rewrites its results. What an earlier search of a
    different spec left, finished or interrupted, is never discarded without ``--fresh``:
    the user chooses that or another ``name``.
    """
    experiment = storage.join(spec.ray_storage, "search")
    if mode == "fresh":
        return False
    earlier_path = spec.run_dir / SEARCH_IDENTITY_FILE
    earlier = json.loads(earlier_path.read_text()) if earlier_path.is_file() else None
    restorable = tune.Tuner.can_restore(experiment)
    finished = (spec.run_dir / "summary.json").is_file()
    identity = search_identity(spec, search)
    same = earlier == identity
    if mode == "resume" and not restorable:
        raise RkdError(f"--resume: there is no interrupted search to resume in {experiment}")
    if (restorable or finished) and not (restorable and same):
        what = "an interrupted" if restorable and not finished else "a finished"
        changed = sorted(k for k, v in identity.items() if earlier is None or earlier.get(k) != v)
        why = f"made from a different spec (changed: {', '.join(changed)})" if not same else "whose Ray state is gone"
        raise RkdError(
            f"{spec.run_dir} holds {what} search {why}; nothing was changed. Give this search another `name` "
            f"(or --output-dir) to keep both, or rerun with --fresh to delete the earlier one"
        )
    return restorable and same


def start_afresh(spec: RunSpec, search: SearchConfig) -> None:
    """Clear what an earlier search of this name left, and record what this one is."""
    for old in (spec.run_dir / "ray" / "search", spec.run_dir / "ray" / "trials"):
        if old.exists():
            shutil.rmtree(old)
    for name in RESULT_FILES:  # from now on, this search is the unfinished one: no stale front may be read
        (spec.run_dir / name).unlink(missing_ok=True)
    confirm_stage.clear(spec.run_dir, spec.ray_storage, spec.run_uri)  # its pairs belong to the earlier trials
    atomic_write_json(spec.run_dir / SEARCH_IDENTITY_FILE, search_identity(spec, search))
    if spec.run_uri:
        for old_uri in (storage.join(spec.ray_storage, "search"), storage.join(spec.ray_storage, "trials"),
                        *(storage.join(spec.run_uri, name) for name in RESULT_FILES)):
            storage.delete(old_uri)
        storage.push(spec.run_dir / SEARCH_IDENTITY_FILE, storage.join(spec.run_uri, SEARCH_IDENTITY_FILE))


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
    teacher = prepare_teacher(spec, log)

    ctx = {
        "student": spec.student,
        "base_methods": spec.student.methods,
        "data": spec.data,
        "num_classes": len(TASKS[spec.task].class_names(spec.data)),
        "task": spec.task,
        "input_size": int(spec.data["input_size"]),
        "seed": spec.seed,
        "resources": spec.resources,
        "teacher_checkpoint": shared_checkpoint(spec, teacher),
        "max_gflops": search.max_gflops,
        "storage": storage.join(spec.ray_storage, "trials"),
        "local_storage": str(spec.run_dir / "ray" / "trials"),
        "priors": str(spec.run_dir / "priors"),
        "priors_remote": storage.join(spec.run_uri, "priors") if spec.run_uri else None,
        "eval_each_epoch": search.scheduler is not None or search.stop is not None,
        "objectives": search.objectives,
    }
    searcher = ParetoOptunaSearch(
        space=space.define_by_run,
        metric=list(search.objectives),
        mode=["max" if OBJECTIVES[o] else "min" for o in search.objectives],
        sampler=make_sampler(search.sampler, search.seed, search.trials),
        points_to_evaluate=first_points(space, search),
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
            tune_config=tune.TuneConfig(search_alg=limited, num_samples=search.trials, scheduler=scheduler,
                                        reuse_actors=reuse_trial_processes(spec.resources)),
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
        summary = write_results(spec, rows, teacher.to_dict(), time.perf_counter() - start, search.objectives,
                                confirmed)
    if spec.run_uri:
        storage.push(spec.run_dir, spec.run_uri, exclude=("ray",))
    front = front_rows(rows, search.objectives)
    log("")
    log(f"Pareto front of {spec.name}: {len(front)} of {len(rows)} trials (teacher {TASKS[spec.task].metric_label} {teacher.score:.3f}, "
        f"{teacher.gflops:.3f} GFLOPs)")
    log(format_table(front, front_columns(search.objectives)) if front else "(no complete trial: nothing on the front)")
    if confirmed is not None:
        log(confirm_report(confirmed))
    log(f"\nresults in {spec.run_uri or spec.run_dir}: trials.parquet, pareto.parquet, pareto.png, summary.json "
        f"({summary['wall_s']:.0f}s)")
    return summary
