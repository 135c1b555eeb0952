"""The ``rkd`` command line.

User errors (a bad spec, a missing file, a label line that does not parse, a
teacher below ``min_map``) print one clear message and exit with code 2;
tracebacks are for rkd's own bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rkd import __version__
from rkd.errors import RkdError
from rkd.schema import ALLOW_CODE_ENV


def _cmd_search(args: argparse.Namespace) -> int:
    from rkd.search.runner import run_search
    from rkd.train.spec import load_spec

    spec = load_spec(args.spec)
    if args.trials is not None:
        spec.search["trials"] = args.trials
    if args.output_dir is not None:
        spec.output_dir = Path(args.output_dir).resolve()
    run_search(spec, resume="fresh" if args.fresh else "resume" if args.resume else "auto")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rkd.search.preflight import check_inputs, check_resources, fill_data_caches
    from rkd.train.runner import ensure_ray
    from rkd.train.spec import load_spec
    from rkd.train.stages import run_stages

    spec = load_spec(args.spec)
    if args.output_dir is not None:
        spec.output_dir = Path(args.output_dir).resolve()
    check_inputs(spec)  # every label file and image is read (and checked) before Ray starts
    ensure_ray(spec.resources.ray_address)
    check_resources(spec)
    fill_data_caches(spec)
    run_stages(spec, args.stage)
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from rkd.models.flops import count_flops
    from rkd.train.spec import load_spec
    from rkd.train.tasks import TASKS

    spec = load_spec(args.spec)
    task = TASKS[spec.task]
    size = int(spec.data["input_size"])
    k = len(task.class_names(spec.data))
    for role, cfg in (("teacher", spec.teacher), ("student", spec.student)):
        report = count_flops(task.build_model(cfg.model, k), size)
        print(f"{role:8s} {report.gflops:9.3f} GFLOPs  {report.params / 1e6:7.3f} M params  at {size}x{size}")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    import json

    import pyarrow.parquet as pq

    from rkd import storage
    from rkd.metrics import metric_label
    from rkd.search.confirm import confirm_report
    from rkd.search.headroom import headroom_line
    from rkd.search.results import format_table, front_columns, front_rows, knee, run_objectives, trials_path

    run = storage.local_run(args.run)
    rows = pq.read_table(trials_path(run)).to_pylist()
    objectives = run_objectives(run)
    front = front_rows(rows, objectives)
    accuracy = objectives[0]
    label = metric_label(accuracy)
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary:
        teacher = summary["teacher"]
        print(f"teacher: {label} {teacher[accuracy]:.3f}, {teacher['gflops']:.3f} GFLOPs")
        if summary.get("teacher_headroom") is not None:  # summaries before 2026-12-06 lack it
            print(headroom_line(summary["teacher_headroom"]))
    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    print(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(format_table(front, front_columns(objectives)) if front else "(no complete trial on the front)")
    best = knee(front, accuracy)
    if best:
        print(f"knee point: {best['trial_id']} ({label} {best[accuracy]:.3f}, {best['gflops']:.3f} GFLOPs)")
    if summary.get("confirm") is not None:
        print(confirm_report(summary["confirm"]))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import datetime

    from rkd.data import cache as patch_cache
    from rkd.metrics import metric_label
    from rkd.train import teacher_cache, teacher_outputs

    if args.cache_action == "ls":
        patches = patch_cache.scenes()
        print(
            f"{sum(s.patches for s in patches)} decoded patch(es) of {len(patches)} scene(s), "
            f"{sum(s.bytes for s in patches) / 1e6:.1f} MB, in {patch_cache.cache_dir()}"
        )
        outputs = teacher_outputs.kept()
        print(
            f"teacher outputs of {len(outputs)} input(s), {sum(f.stat().st_size for f in outputs) / 1e6:.1f} MB, "
            f"in {teacher_outputs.cache_dir()}"
        )
        kept = teacher_cache.entries()
        print(f"{len(kept)} trained teacher(s) kept in {teacher_cache.cache_dir()}")
        for e in kept:
            when = datetime.datetime.fromtimestamp(e.get("stored", 0.0)).strftime("%Y-%m-%d %H:%M")
            metric = e.get("metric", "map50")
            print(
                f"{e['hash'][:12]}  {when}  run {e.get('run')!r}  {metric_label(metric)} {e.get(metric, float('nan')):.3f}"
                f"  {e['bytes'] / 1e6:.1f} MB"
            )
        return 0
    if args.outputs:
        if args.hashes or args.all or args.patches or args.older_than is not None:
            raise RkdError("rkd cache prune --outputs: takes nothing (every kept teacher output)")
        gone = teacher_outputs.prune()
        print(f"deleted the kept teacher outputs of {gone} input(s)")
        return 0
    if args.patches:
        if args.hashes or args.all:
            raise RkdError("rkd cache prune --patches: takes --older-than DAYS or nothing (every patch), not teachers")
        scenes = patch_cache.prune_scenes(args.older_than)
        print(f"deleted the decoded patches of {len(scenes)} scene(s), {sum(s.bytes for s in scenes) / 1e6:.1f} MB")
        return 0
    if not (args.hashes or args.all or args.older_than is not None):
        raise RkdError("rkd cache prune: name the teachers (hashes from 'rkd cache ls'), or give --all or --older-than")
    gone = teacher_cache.prune(args.hashes, args.all, args.older_than)
    print(f"deleted {len(gone)} kept teacher(s), {sum(e['bytes'] for e in gone) / 1e6:.1f} MB")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from rkd.train.spec_schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def _allow_code_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-code",
        action="store_true",
        help=f"let the spec import and run the Python it names (a prior's `target`); same as {ALLOW_CODE_ENV}=1",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="train/load the teacher, search KD methods and students, write the Pareto front")
    p.add_argument("spec", help="the run spec (YAML)")
    p.add_argument("--trials", type=int, help="override search.trials")
    p.add_argument("--output-dir", help="where runs/<name> goes (default: ./runs, or the spec's output_dir)")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search of this spec (the default whenever there is one)",
    )
    again.add_argument("--fresh", action="store_true", help="discard an earlier search of this name and start over")
    _allow_code_flag(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("train", help="train (or load) the teacher, then distil the spec's student with its methods")
    p.add_argument("spec", help="the run spec (YAML)")
    p.add_argument("--stage", choices=["all", "teacher", "student"], default="all", help="default: all")
    p.add_argument("--output-dir", help="where runs/<name> goes (default: ./runs, or the spec's output_dir)")
    _allow_code_flag(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("flops", help="GFLOPs and parameters of the spec's teacher and student")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("results", help="print the Pareto front and knee point of a finished search")
    p.add_argument("run", help="the run folder, runs/<name>, or its storage URI (s3://..., gs://...)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("cache", help="trained teachers, teacher outputs and decoded patches kept for reuse by any run")
    actions = p.add_subparsers(dest="cache_action", required=True)
    actions.add_parser(
        "ls", help="the patch cache's size, and the kept teachers: hash, date, the run that trained them, score, size"
    )
    prune = actions.add_parser("prune", help="delete kept teachers (the next run that needs one trains it again)")
    prune.add_argument("hashes", nargs="*", help="hashes (or unique prefixes) from 'rkd cache ls'")
    prune.add_argument("--all", action="store_true", help="delete every kept teacher")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="delete those kept more than DAYS ago")
    prune.add_argument(
        "--patches",
        action="store_true",
        help="delete decoded patches instead of teachers (every scene's, or with --older-than those "
        "built more than DAYS ago)",
    )
    prune.add_argument(
        "--outputs", action="store_true", help="delete the kept teacher outputs instead (teacher.cache; all of them)"
    )
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser(
        "schema", help="write the JSON Schemas of spec and search-space files (editors validate and complete with them)"
    )
    p.add_argument(
        "--out",
        default="schemas",
        help="the folder to write rkd-spec.schema.json and rkd-space.schema.json into (default: schemas)",
    )
    p.set_defaults(func=_cmd_schema)

    from rkd.data.cli import add_commands as add_data_commands
    from rkd.deploy.cli import add_commands as add_deploy_commands  # export, predict, submit, status, logs
    from rkd.eval.cli import add_commands as add_evaluate_commands
    from rkd.search.report import add_commands as add_report_commands  # report
    from rkd.search.show import add_commands as add_space_commands  # space show

    add_deploy_commands(sub)
    add_space_commands(sub)
    add_report_commands(sub)
    add_data_commands(sub)
    add_evaluate_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_code", False):
        os.environ[ALLOW_CODE_ENV] = "1"  # read where specs are validated, and inherited by the local Ray's workers
    # Ray's own chatter is not what a user of rkd needs to read.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        return args.func(args)
    except RkdError as err:
        print(f"rkd: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("rkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
