"""The search's confirm stage: is a front point's gain over its no-KD twin more than seed noise?

A search keeps the best of many noisy trainings, so the front's scores are optimistic, and a KD
point a little above the student without KD may owe its place to a lucky seed. With
``search.confirm: {top: K, seeds: N}`` K front points that use KD (the most accurate, the one of
fewest GFLOPs, then points between them) are trained again with N fresh seeds, and so is each one's
*twin*: the same student (architecture, lr, epochs, data, every ``student.*`` parameter of the point)
with every KD method off. Candidate and twin share
each seed, so they share the data order and, where the architecture is the same, the initial
weights; the gain is judged on the paired differences ``d_s = score(candidate, s) - score(twin, s)``:

* gain = mean(d), and its 95% interval ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)`` (Student t,
  ``sd`` with n-1 degrees of freedom): the paired t interval, e.g. Hsu & Lachenbruch, "Paired t
  Test", Wiley StatsRef (2014), DOI 10.1002/9781118445112.stat05929. With one pair there is no
  interval (null), never a made-up one.

Seeds: ``spec.seed + 1``, ..., ``spec.seed + N``; the search's trials all ran with ``spec.seed``, so
these are fresh, and the first N stay the same when N grows (those pairs are reused).

The trainings are the search's own trials (:func:`rkd.search.trial.distill_trial`) in a second
Tune experiment (``ray/confirm``) with the same resources, storage and checkpoints. Each finished
training is recorded in ``confirm/<job>.json`` (atomically), named by a hash of what it trains;
a rerun trains only the jobs without a record, and an interrupted confirm experiment of the same
jobs resumes its unfinished trainings from their last checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from rkd import storage
from rkd.schema import Section
from rkd.search.results import front_rows
from rkd.train.checkpoint import atomic_write_json
from rkd.train.runner import launcher_resources, reuse_trial_processes

if TYPE_CHECKING:
    from rkd.search.trial import TrialContext

CONFIRM_KEYS = {"top", "seeds"}
LEVEL = 0.95  # of the gain's interval
RECORDS = "confirm"  # RUN/confirm/<job>.json: one finished training each
EXPERIMENT = "confirm"  # RUN/ray/confirm: the Tune experiment of the trainings still to do
JOBS_FILE = "confirm_jobs.json"  # the jobs of that experiment: it is resumed only for the same jobs
# A twin trains no KD, so the KD loss balance settings change nothing in it: left out, twins that
# differ only there are one training.
_KD_ONLY = ("student.kd_balance.",)


def parse_confirm(sec: Section) -> dict[str, int]:
    """``search.confirm``: ``top`` (>= 1) front points, each and its twin trained with ``seeds`` (>= 2) seeds."""
    sec.reject_unknown(CONFIRM_KEYS)
    return {"top": sec.int("top", low=1), "seeds": sec.int("seeds", low=2)}


def confirm_seeds(seed: int, n: int) -> list[int]:
    """The confirm stage's seeds: the ``n`` after the spec's seed (the one every search trial used).

    >>> confirm_seeds(0, 3)
    [1, 2, 3]
    """
    return [seed + 1 + i for i in range(n)]


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); ``None`` where undefined."""
    x = np.asarray(values, dtype=np.float64)
    return (float(x.mean()) if len(x) else None), (float(x.std(ddof=1)) if len(x) > 1 else None)


def paired_gain(candidate: list[float], twin: list[float], level: float = LEVEL) -> dict[str, Any]:
    """The gain of ``candidate`` over ``twin`` from scores paired by seed (same order), with its interval.

    >>> g = paired_gain([0.5, 0.6, 0.7], [0.4, 0.45, 0.65])
    >>> round(g["mean"], 4), round(g["low"], 4), round(g["high"], 4), g["includes_zero"]
    (0.1, -0.0242, 0.2242, True)
    >>> paired_gain([0.5], [0.4])["low"] is None
    True
    """
    if len(candidate) != len(twin):
        raise ValueError(f"paired scores need as many twins as candidates, got {len(candidate)} and {len(twin)}")
    d = np.asarray(candidate, dtype=np.float64) - np.asarray(twin, dtype=np.float64)
    mean, sd = mean_sd(d.tolist())
    low = high = None
    if len(d) > 1:
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        low, high = mean - half, mean + half
    c_mean, c_sd = mean_sd(candidate)
    t_mean, t_sd = mean_sd(twin)
    return {
        "n": len(d),
        "mean": mean,
        "sd": sd,
        "level": level,
        "low": low,
        "high": high,
        "includes_zero": None if low is None else bool(low <= 0.0 <= high),
        "candidate": {"scores": list(map(float, candidate)), "mean": c_mean, "std": c_sd},
        "twin": {"scores": list(map(float, twin)), "mean": t_mean, "std": t_sd},
    }


def format_gain(gain: dict[str, Any] | None) -> str:
    """``+0.031 [+0.012, +0.050]``, ``... interval includes 0`` where it does.

    >>> format_gain({"n": 3, "mean": 0.031, "low": -0.004, "high": 0.066, "includes_zero": True})
    '+0.031 [-0.004, +0.066] interval includes 0'
    >>> format_gain({"n": 1, "mean": 0.031, "low": None, "high": None, "includes_zero": None})
    '+0.031 (1 pair: no interval)'
    """
    if not gain or gain.get("mean") is None:
        return "no complete pair"
    if gain.get("low") is None:
        return f"{gain['mean']:+.3f} ({gain['n']} pair{'s' * (gain['n'] != 1)}: no interval)"
    text = f"{gain['mean']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"
    return text + " interval includes 0" if gain["includes_zero"] else text


def candidates(
    rows: list[dict[str, Any]], objectives: tuple[str, ...], top: int, spec_methods: bool = False
) -> list[dict[str, Any]]:
    """``top`` front points that use KD (a point without KD is its own twin), spread over the front:
    the most accurate, the one of fewest GFLOPs, then points evenly between them by GFLOPs rank (of
    those with no more GFLOPs than the most accurate, on a front of three objectives); returned most
    accurate first.

    The most accurate point is usually the largest student, where the teacher has the least left to
    teach; a user with a FLOPs budget deploys a smaller one, so its gain is confirmed too.
    ``spec_methods``: the spec's student has methods of its own, which every trial uses.
    """
    front = [r for r in front_rows(rows, objectives) if r.get("kd_methods") or spec_methods]
    accuracy = objectives[0]
    best_first = sorted(front, key=lambda r: (-r[accuracy], r["gflops"], r["trial_id"]))
    if top >= len(front) or top == 1:
        return best_first[:top]
    cheap_first = sorted(front, key=lambda r: (r["gflops"], -r[accuracy], r["trial_id"]))
    # GFLOPs ranks from 0 to the most accurate's (the last on a two-objective front) in even steps;
    # where two steps round to one rank, the cheapest points not taken make up the number.
    last = cheap_first.index(best_first[0])
    picked = {best_first[0]["trial_id"]: best_first[0]}
    for i in range(top - 1):
        row = cheap_first[round(i * last / (top - 1))]
        picked.setdefault(row["trial_id"], row)
    for row in cheap_first:
        if len(picked) == top:
            break
        picked.setdefault(row["trial_id"], row)
    return sorted(picked.values(), key=best_first.index)


def twin_params(params: dict[str, Any]) -> dict[str, Any]:
    """A point's no-KD twin: its student parameters alone (every method off, the spec's too)."""
    return {k: v for k, v in params.items() if k.startswith("student.") and not k.startswith(_KD_ONLY)}


def _job(params: dict[str, Any], seed: int, kd: bool) -> dict[str, Any]:
    body = json.dumps({"params": params, "seed": seed, "kd": kd}, sort_keys=True, default=str)
    key = f"{'kd' if kd else 'twin'}-{hashlib.sha1(body.encode()).hexdigest()[:10]}-s{seed}"
    return {"key": key, "params": params, "seed": seed, "kd": kd}


def plan_jobs(points: list[dict[str, Any]], seeds: list[int]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The trainings for ``points`` (rows with ``params``): ``({key: job}, [pairs])``.

    A pair is ``{trial_id, seed, kd, twin}`` (job keys); twins shared by several points (same
    student parameters) are one job per seed.
    """
    jobs: dict[str, dict[str, Any]] = {}
    pairs = []
    for row in points:
        for seed in seeds:
            kd, twin = _job(dict(row["params"]), seed, True), _job(twin_params(row["params"]), seed, False)
            jobs.setdefault(kd["key"], kd)
            jobs.setdefault(twin["key"], twin)
            pairs.append({"trial_id": row["trial_id"], "seed": seed, "kd": kd["key"], "twin": twin["key"]})
    return jobs, pairs


def confirm_trial(config: dict[str, Any], ctx: TrialContext, jobs: dict[str, dict[str, Any]]) -> None:
    """One confirm training: the search's trial function, with the job's parameters and seed."""
    from rkd.search.trial import distill_trial

    job = jobs[config["job"]]
    distill_trial(job["params"], replace(ctx, seed=job["seed"], base_methods=ctx.base_methods if job["kd"] else {}))


def summarise(
    points: list[dict[str, Any]], pairs: list[dict[str, Any]], records: dict[str, dict[str, Any]], accuracy: str
) -> list[dict[str, Any]]:
    """One entry per point: its seeds' scores, the twin's, and the paired gain (failed pairs left out)."""
    out = []
    for row in points:
        mine = [p for p in pairs if p["trial_id"] == row["trial_id"]]
        done = [
            p
            for p in mine
            if records.get(p["kd"], {}).get("score") is not None and records.get(p["twin"], {}).get("score") is not None
        ]
        sides = [records[k] for p in mine for k in (p["kd"], p["twin"]) if k in records]
        failed = sorted({f"{r['status']}: {r.get('reason')}" for r in sides if r.get("score") is None})
        gain = paired_gain([records[p["kd"]]["score"] for p in done], [records[p["twin"]]["score"] for p in done])
        out.append(
            {
                "trial_id": row["trial_id"],
                "kd_methods": row.get("kd_methods"),
                "reference": row.get("reference"),
                "gflops": row.get("gflops"),
                "search_" + accuracy: row.get(accuracy),
                "seeds": [p["seed"] for p in done],
                "candidate": gain.pop("candidate"),
                "twin": gain.pop("twin"),
                "gain": gain,
                "failed": failed,
            }
        )
    return out


def _records(run_dir: Path) -> dict[str, dict[str, Any]]:
    folder = run_dir / RECORDS
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def clear(run_dir: Path, ray_storage: str, run_uri: str | None) -> None:
    """Forget an earlier search's confirm stage (a fresh search starts)."""
    for old in (run_dir / RECORDS, run_dir / "ray" / EXPERIMENT):
        if old.exists():
            shutil.rmtree(old)
    (run_dir / JOBS_FILE).unlink(missing_ok=True)
    if run_uri:
        for old_uri in (
            storage.join(run_uri, RECORDS),
            storage.join(ray_storage, EXPERIMENT),
            storage.join(run_uri, JOBS_FILE),
        ):
            storage.delete(old_uri)


def run_confirm(
    spec: Any,
    confirm: dict[str, int],
    rows: list[dict[str, Any]],
    objectives: tuple[str, ...],
    ctx: TrialContext,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train what is missing of the confirm stage and return its summary (``summary.json: confirm``)."""
    from ray import tune

    from rkd.search.progress import ProgressPrinter
    from rkd.search.rows import trial_status

    accuracy = objectives[0]
    seeds = confirm_seeds(spec.seed, confirm["seeds"])
    points = candidates(rows, objectives, confirm["top"], bool(ctx.base_methods))
    jobs, pairs = plan_jobs(points, seeds)
    records = _records(spec.run_dir)
    todo = sorted(k for k in jobs if k not in records)
    head = {**confirm, "level": LEVEL, "metric": accuracy, "seed_list": seeds}
    if not points:
        log("[confirm] no front point uses KD: nothing to confirm")
        return {**head, "points": []}
    log(
        f"[confirm] {len(points)} front points and their no-KD twins, {len(seeds)} seeds each: "
        f"{len(todo)} of {len(jobs)} trainings to run"
    )
    if todo:
        experiment = storage.join(spec.ray_storage, EXPERIMENT)
        jobs_path = spec.run_dir / JOBS_FILE
        earlier = json.loads(jobs_path.read_text()) if jobs_path.is_file() else None
        ctx = replace(ctx, eval_each_epoch=False, max_gflops=None, objectives=(accuracy, "gflops"))
        trainable = tune.with_resources(
            tune.with_parameters(confirm_trial, ctx=ctx, jobs=jobs), launcher_resources(ctx.resources)
        )
        if earlier == todo and tune.Tuner.can_restore(experiment):
            log(f"[confirm] resuming {experiment}: unfinished trainings continue from their checkpoints")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
        else:
            if (spec.run_dir / "ray" / EXPERIMENT).exists():
                shutil.rmtree(spec.run_dir / "ray" / EXPERIMENT)
            if spec.run_uri:
                storage.delete(experiment)
            atomic_write_json(jobs_path, todo)
            tuner = tune.Tuner(
                trainable,
                param_space={"job": tune.grid_search(todo)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=spec.resources.max_concurrent_trials,
                    reuse_actors=reuse_trial_processes(spec.resources),
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=spec.ray_storage,
                    callbacks=[
                        ProgressPrinter(
                            len(todo),
                            metric=accuracy,
                            describe=partial(describe_job, jobs),
                            stage="confirm",
                            first_tag=0,  # tune.grid_search's variants are tagged 0, 1, ...
                        )
                    ],
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        for result in tuner.fit():
            key = (result.config or {}).get("job")
            if key in jobs:
                status, reason = trial_status(result)
                score = (result.metrics or {}).get(accuracy) if status == "complete" else None
                record = {**jobs[key], "status": status, "reason": reason, "score": score}
                atomic_write_json(spec.run_dir / RECORDS / f"{key}.json", record)
                records[key] = record
    return {**head, "points": summarise(points, pairs, records, accuracy)}


def confirm_report(confirm: dict[str, Any]) -> str:
    """The confirm stage's table under a line that says what it measured."""
    if not confirm["points"]:
        return "\nconfirmed: no front point uses KD, nothing to confirm"
    return (
        f"\nconfirmed (each point and its no-KD twin re-trained with seeds {confirm['seed_list']}; gain: mean "
        f"paired difference, {confirm['level']:.0%} t interval):\n" + confirm_table(confirm)
    )


def confirm_table(confirm: dict[str, Any]) -> str:
    """The confirmed points as a text table (``rkd results``, the end of ``rkd search``)."""
    from rkd.metrics import metric_label
    from rkd.search.results import format_table

    label = metric_label(confirm["metric"])
    rows = [
        {
            "trial_id": p["trial_id"],
            "kd_methods": p["kd_methods"],
            "gflops": p["gflops"],
            "search": p.get(f"search_{confirm['metric']}"),
            "pairs": p["gain"]["n"],
            "candidate": _mean_sd(p["candidate"]),
            "twin": _mean_sd(p["twin"]),
            "gain": format_gain(p["gain"]),
        }
        for p in confirm["points"]
    ]
    columns = [
        ("trial_id", "trial"),
        ("kd_methods", "KD methods"),
        ("gflops", "GFLOPs"),
        ("search", f"search {label}"),
        ("pairs", "seeds"),
        ("candidate", f"{label} mean+-sd"),
        ("twin", "no-KD twin mean+-sd"),
        ("gain", f"gain over twin [{confirm['level']:.0%} CI]"),
    ]
    return format_table(rows, columns)


def _mean_sd(side: dict[str, Any]) -> str:
    if side["mean"] is None:
        return "-"
    return f"{side['mean']:.3f}" + (f" +- {side['std']:.3f}" if side["std"] is not None else "")


def describe_job(jobs: dict[str, dict[str, Any]], config: dict[str, Any]) -> str:
    """A confirm training in the progress lines: its seed, and its parameters or ``twin of ...``."""
    from rkd.search.progress import describe_params

    job = jobs.get(config.get("job"))
    if job is None:
        return str(config)
    return f"seed {job['seed']} {'KD' if job['kd'] else 'no-KD twin'}: {describe_params(job['params'])}"
