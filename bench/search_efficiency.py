"""Does the configured TPE sampler find a better front than random search, for the same trials?

For each seed, the same cheap but real search (synthetic data at 128 px, a few
training images, students of 1-2 epochs, a small space of student width, FPN
channels, learning rate and two KD methods) runs once with ``search.sampler: tpe``
and once with ``random``, through :func:`rkd.search.runner.run_search` (Ray Tune +
Optuna, each trial a Ray Train distillation). One teacher is trained first and
loaded by every search, so the samplers see the same teacher.

Reported: the hypervolume of the complete trials after each number of trials
(mean over seeds), against ONE reference point shared by all runs (1.1 x the
largest GFLOPs seen, teacher included) so runs are comparable; and after how many trials
TPE reaches the hypervolume random search has after all of them (target: half).

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_efficiency.py --seeds 0 1 2 --trials 12 --ray-cpus 2

Each trial takes ~20-40 s on one CPU core; seeds x 2 x trials trials run in all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from rkd.search.report import creation_index, finish_order, hypervolume_curve, load_run, read_curves

SPACE = {
    "student": {
        "model.backbone.width": {"choices": [0.25, 0.5, 0.75, 1.0]},
        "model.neck.channels": {"choices": [16, 32, 48]},
        "lr": {"low": 1.0e-3, "high": 8.0e-3, "log": True},
    },
    "methods": {
        "fitnet": {"weight": "default"},
        "hinton": {"weight": "default", "temperature": "default"},
    },
}


def spec_dict(name: str, args: argparse.Namespace, teacher_checkpoint: str | None) -> dict:
    teacher = {
        "model": {
            "kind": "retinanet",
            "boxes": "obb",
            "backbone": {"name": "convnet", "width": 1.0, "depth": 1},
            "neck": {"channels": 48},
            "head": {"convs": 1},
        },
        "epochs": args.teacher_epochs,
        "batch_size": 4,
        "lr": 4.0e-3,
        "min_map": 0.0,
    }
    if teacher_checkpoint:
        teacher["checkpoint"] = teacher_checkpoint
    return {
        "name": name,
        "seed": 0,  # training noise is the same for every run; only the sampler's seed varies
        "output_dir": str(args.workdir / "runs"),
        "data": {
            "format": "synthetic",
            "num_classes": 3,
            "num_train": args.train_images,
            "num_val": args.val_images,
            "input_size": 128,
            "seed": 0,
        },
        "teacher": teacher,
        "student": {
            "model": {
                "kind": "retinanet",
                "boxes": "obb",
                "backbone": {"name": "convnet", "width": 0.5, "depth": 1},
                "neck": {"channels": 32},
                "head": {"convs": 1},
            },
            "epochs": args.epochs,
            "batch_size": 4,
            "lr": 3.0e-3,
        },
        "search": {"space": str(args.workdir / "space.yaml"), "trials": args.trials},
        "resources": {"workers": 1, "cpus_per_worker": args.cpus},
    }


def trials_to_reach(curve, value: float) -> int | None:
    """First trial count at which ``curve`` is at least ``value`` (None: never)."""
    return next((i + 1 for i, v in enumerate(curve) if v >= value - 1e-12), None)


def write_spec(path: Path, data: dict):
    from rkd.train.spec import load_spec

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    ap.add_argument("--trials", type=int, default=10, help="trials per search (default 10)")
    ap.add_argument("--epochs", type=int, default=4, help="student epochs (default 4)")
    ap.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default 30)")
    ap.add_argument("--train-images", type=int, default=32, help="synthetic training images (default 32)")
    ap.add_argument("--val-images", type=int, default=16, help="synthetic validation images (default 16)")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs per training worker (default 1)")
    ap.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="CPUs of the embedded Ray, so trials run --ray-cpus / --cpus at a time (default --cpus)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rkd_search_efficiency"), help="scratch folder (wiped)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    (args.workdir / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))

    from rkd.search.runner import run_search
    from rkd.train.runner import ensure_ray
    from rkd.train.teacher import prepare_teacher

    start = time.perf_counter()
    ensure_ray(None, num_cpus=args.ray_cpus or args.cpus, quiet=True)
    teacher = prepare_teacher(write_spec(args.workdir / "teacher.yaml", spec_dict("teacher", args, None)))
    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    rows_by_run, gflops = {}, [teacher.gflops]
    for seed in args.seeds:
        for sampler in ("tpe", "random"):
            name = f"{sampler}-seed{seed}"
            data = spec_dict(name, args, teacher.checkpoint)
            data["search"].update(sampler=sampler, seed=seed)
            spec = write_spec(args.workdir / f"{name}.yaml", data)
            t0 = time.perf_counter()
            run_search(spec, log=lambda s: None)
            rows, _ = load_run(spec.run_dir)
            created = creation_index(spec.run_dir, [r["trial_id"] for r in rows])
            rows_by_run[(sampler, seed)] = finish_order(rows, read_curves(spec.run_dir), created)
            gflops += [r["gflops"] for r in rows if r["gflops"] is not None]
            done = sum(r["status"] == "complete" for r in rows)
            print(f"{name}: {len(rows)} trials ({done} complete) in {time.perf_counter() - t0:.0f}s", flush=True)
    ref = 1.1 * max(gflops)
    for (sampler, _), rows in rows_by_run.items():
        curves[sampler].append(hypervolume_curve(rows, ref))

    n = args.trials
    mean = {s: np.mean(np.array(c, dtype=float), axis=0) for s, c in curves.items()}
    half = max(1, n // 2)
    # The target: TPE reaches random search's final hypervolume in at most half the trials.
    target = float(mean["random"][n - 1])
    reach = trials_to_reach(mean["tpe"], target)
    per_seed = [trials_to_reach(t, r[n - 1]) for t, r in zip(curves["tpe"], curves["random"])]
    print(f"\nhypervolume (reference: mAP50 0, {ref:.4g} GFLOPs), mean over seeds {args.seeds}")
    print("trials  " + "  ".join(f"{s:>8s}" for s in mean))
    for i in range(n):
        print(f"{i + 1:6d}  " + "  ".join(f"{mean[s][i]:8.4f}" for s in mean))
    print(
        f"random search after {n} trials: {target:.4f}; TPE reaches it after "
        + (f"{reach} trials" if reach else f"more than {n} trials")
        + f" (target: <= {half}); per seed: {per_seed}"
    )
    print(f"teacher: mAP50 {teacher.map50:.3f}, {teacher.gflops:.4g} GFLOPs; wall {time.perf_counter() - start:.0f}s")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "seeds": args.seeds,
                    "trials": n,
                    "epochs": args.epochs,
                    "ref_gflops": ref,
                    "per_seed": {s: c for s, c in curves.items()},
                    "mean": {s: m.tolist() for s, m in mean.items()},
                    "random_final_hv": target,
                    "tpe_trials_to_reach": reach,
                    "tpe_trials_to_reach_per_seed": per_seed,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
