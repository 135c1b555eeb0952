"""KD gain on real images: each KD method against the same student trained without KD, over seeds.

For the spec's teacher-student pair (default ``examples/ucas50.yaml``: UCAS-AOD planes and cars,
Lite0 RetinaNet-OBB teacher, convnet w0.5 student) this trains, for every seed, the student
without KD and with each configuration named on the command line, all through ``rkd train``'s
student stage (the same Ray Train loop as a search trial), from one teacher trained (or loaded)
once. Configurations:

* ``nokd``: the student alone;
* ``<method>``: the method alone at rkd's defaults (its parameters' defaults, ``kd_balance: auto``);
* ``<method>@published``: the method alone at its published configuration: published weights
  (``kd_balance: off``) and each parameter's published value where rkd's default differs
  (``Param.published``; before 2026-12-05 the other parameters kept rkd's defaults);
* ``<name>=<json>``: any ``{methods: ..., kd_balance: ..., <student path>: value}`` mapping,
  e.g. the best configuration of a search.

Every run is appended to ``--out`` (JSON) as it finishes, so a stopped benchmark resumes where
it stopped. Each configuration's gain is the paired difference with ``nokd`` (or ``--baseline``) of
the same seed (same initialisation and data order): mean, sample std, the 95% Student-t interval,
the seeds won and the Wilcoxon signed-rank p; the table is printed as Markdown for
``docs/benchmarks.md``. ``--baseline-from`` pairs with the student alone recorded in other files
(it does not depend on the teacher), e.g. another teacher's KD runs with the same no-KD seeds:

    .venv/bin/python bench/kd_gain.py --summary --out bench/results/kd_gain_aid_lite2_r224.json \
        --baseline nokd-lr17 --baseline-from bench/results/kd_gain_aid_lite2_lr.json

Runs take the lock file ``/tmp/rkd-train.lock`` so they never overlap another training on the machine.

    .venv/bin/python bench/kd_gain.py --seeds 0 1 2 --configs nokd hinton hinton@published fitnet
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rkd.distill import KD_METHODS
from rkd.distill.base import published_hparams
from rkd.search.confirm import paired_gain  # the confirm stage's paired t interval
from rkd.train.runner import ensure_ray
from rkd.train.spec import load_spec, with_overrides
from rkd.train.stages import distil_student
from rkd.train.tasks import TASKS
from rkd.train.teacher import prepare_teacher

ROOT = Path(__file__).resolve().parents[1]


def config_of(name: str, registry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The student overrides a configuration name stands for (``registry``: the task's KD methods)."""
    if "=" in name:
        return json.loads(name.split("=", 1)[1])
    if name == "nokd":
        return {"methods": {}}
    method, _, variant = name.partition("@")
    if variant not in ("", "published"):
        raise SystemExit(f"unknown variant {variant!r} in {name!r}: use <method> or <method>@published")
    if not variant:
        return {"methods": {method: {}}, "kd_balance": {"mode": "auto"}}
    registry = KD_METHODS if registry is None else registry
    if method not in registry:
        raise SystemExit(f"unknown KD method {method!r} in {name!r}; known: {', '.join(sorted(registry))}")
    # the published configuration: the published weights, and the published value of every
    # parameter whose rkd default differs from it (Param.published)
    return {"methods": {method: published_hparams(registry[method].params)}, "kd_balance": {"mode": "off"}}


def label_of(name: str) -> str:
    return name.split("=", 1)[0]


@contextlib.contextmanager
def training_lock(path: str = "/tmp/rkd-train.lock"):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_one(args: argparse.Namespace, name: str, seed: int, teacher: Any) -> dict[str, Any]:
    spec = load_spec(args.spec)
    spec.output_dir = Path(args.output_dir).resolve()
    spec.seed = seed
    # the run folder (and with it Ray's storage) is per code version: a same-config run of older
    # code must not be resumed as if it were this one's
    spec.name = f"{args.tag}-{label_of(name).replace('@', '-')}-s{seed}"
    overrides = config_of(name, TASKS[spec.task].method_registry())
    methods = overrides.pop("methods", {})
    balance = overrides.pop("kd_balance", None)
    if args.epochs:
        overrides["epochs"] = args.epochs
    spec.student = with_overrides(spec.student, overrides, methods, task=spec.task)
    if balance is not None:
        spec.student.kd_balance = {**spec.student.kd_balance, **balance}
    start = time.perf_counter()
    report = distil_student(spec, teacher)
    metrics = _last_metrics(spec.run_dir / "student")
    return {
        "config": label_of(name),
        "seed": seed,
        "tag": args.tag,
        "map50": report.score,
        "gflops": report.gflops,
        "wall_s": round(time.perf_counter() - start, 1),
        "methods": methods,
        "kd_balance": spec.student.kd_balance if methods else None,
        "epochs": spec.student.epochs,
        "balance": {k: v for k, v in metrics.items() if k.startswith(("kd_scale.", "kd_start_ratio.", "kd_warning"))},
        "final_loss": metrics.get("loss"),
    }


def _last_metrics(folder: Path) -> dict[str, Any]:
    """The last epoch's metrics row of a finished stage (``metrics.parquet``)."""
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(folder / "metrics.parquet").to_pylist()
        return {k: v for k, v in rows[-1].items() if v is not None} if rows else {}
    except (OSError, ImportError):
        return {}


def wilcoxon_p(gains: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired gains (scipy); None where it is undefined."""
    if len(gains) < 2 or not any(gains):
        return None
    from scipy.stats import wilcoxon

    return float(wilcoxon(gains).pvalue)


def summarise(runs: list[dict[str, Any]], baseline: str = "nokd") -> list[dict[str, Any]]:
    """One row per configuration; each is paired, seed by seed, with ``baseline``'s runs."""
    by: dict[str, dict[int, float]] = {}
    for r in runs:
        by.setdefault(r["config"], {})[r["seed"]] = r["map50"]
    base = by.get(baseline, {})
    rows = []
    for config, scores in by.items():
        values = list(scores.values())
        row = {
            "config": config,
            "n": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
        seeds = [s for s in scores if s in base]
        if config != baseline and seeds:
            row["gain"] = paired_gain([scores[s] for s in seeds], [base[s] for s in seeds])
            diffs = [scores[s] - base[s] for s in seeds]
            row["wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
            row["p"] = wilcoxon_p(diffs)
        rows.append(row)
    return rows


def with_baseline_from(
    own: list[dict[str, Any]], others: list[list[dict[str, Any]]], baseline: str
) -> list[dict[str, Any]]:
    """``own`` plus the ``baseline`` runs of ``others`` on a (seed, epochs) that ``own`` lacks.

    Only the baseline is taken: the student alone does not depend on the teacher, so one record of
    it pairs with every teacher's KD runs of the same student, data and seeds; KD runs do not.
    """
    have = {(r["seed"], r.get("epochs")) for r in own if r["config"] == baseline}
    extra = []
    for r in (r for runs in others for r in runs if r["config"] == baseline):
        if (r["seed"], r.get("epochs")) not in have:
            have.add((r["seed"], r.get("epochs")))
            extra.append(r)
    return own + extra


def markdown(rows: list[dict[str, Any]], metric: str = "mAP50", baseline: str = "nokd") -> str:
    lines = [
        f"| configuration | seeds | val {metric} mean | std | paired gain over {baseline} | 95% interval | wins | p |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        g = r.get("gain")
        std = f"{r['std']:.3f}" if r["std"] is not None else "-"
        gain = f"{g['mean']:+.3f}" if g else "-"
        ci = "-"
        if g and g["low"] is not None:
            ci = f"[{g['low']:+.3f}, {g['high']:+.3f}]" + (" includes 0" if g["includes_zero"] else "")
        p = f"{r['p']:.2f}" if r.get("p") is not None else "-"
        lines.append(
            f"| {r['config']} | {r['n']} | {r['mean']:.3f} | {std} | {gain} | {ci} | {r.get('wins', '-')} | {p} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "ucas50.yaml"))
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "kd_gain"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kd_gain_ucas50.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["nokd"])
    parser.add_argument("--epochs", type=int, default=0, help="student epochs (0: the spec's)")
    parser.add_argument(
        "--tag", default="v1", help="names this code version's run folders (change it when the code changes)"
    )
    parser.add_argument("--summary", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--baseline", default="nokd", help="the configuration every other one is paired with")
    parser.add_argument(
        "--baseline-from",
        nargs="+",
        default=[],
        metavar="JSON",
        help="pair with --baseline runs recorded in other --out files too (same student, data and seeds, "
        "any teacher); --out's own runs win on (seed, epochs)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    if not args.summary:
        spec = load_spec(args.spec)
        spec.output_dir = Path(args.output_dir).resolve()
        ensure_ray(spec.resources.ray_address)
        with training_lock():
            teacher = prepare_teacher(spec)
        # "map50" holds the task's score (val top-1 for classifiers); "metric" says which
        record["teacher"] = {
            "checkpoint": teacher.checkpoint,
            "map50": teacher.score,
            "gflops": teacher.gflops,
            "metric": teacher.metric,
        }
        record["machine"] = f"{platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}"
        record["spec"] = str(Path(args.spec).resolve().relative_to(ROOT))
        done = {(r["config"], r["seed"], r.get("epochs")) for r in record["runs"]}
        epochs = args.epochs or spec.student.epochs
        for seed in args.seeds:  # seed-major: every configuration gets its pairs early
            for name in args.configs:
                if (label_of(name), seed, epochs) in done:
                    continue
                with training_lock():
                    row = run_one(args, name, seed, teacher)
                    # read again: another benchmark process may have added runs to --out meanwhile
                    if out.is_file():
                        record["runs"] = json.loads(out.read_text())["runs"]
                    record["runs"].append(row)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    tmp.replace(out)
                print(
                    f"[kd_gain] {row['config']} seed {seed}: mAP50 {row['map50']:.3f} ({row['wall_s']:.0f}s)",
                    flush=True,
                )
    teacher_record = record.get("teacher", {})
    metric = {"top1": "top-1"}.get(teacher_record.get("metric"), "mAP50")
    others = [json.loads(Path(f).read_text())["runs"] for f in args.baseline_from]
    runs = with_baseline_from(record["runs"], others, args.baseline)
    for epochs in sorted({r.get("epochs") for r in runs}):
        rows = summarise([r for r in runs if r.get("epochs") == epochs], args.baseline)
        print(f"\nstudent epochs {epochs}, teacher {metric} {teacher_record.get('map50', float('nan')):.3f}")
        print(markdown(rows, metric, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
