"""Helpers of the CLI tests: ``rkd`` commands run in-process, spec files written and read back by line,
and a real run folder (a teacher, five trial students, ``trials.parquet``, ``summary.json``) to pick and export from."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import yaml

import rkd.cli
from rkd.cli import main
from rkd.errors import RkdError
from rkd.models import build_detector
from rkd.search.results import trials_table, write_parquet
from rkd.train.checkpoint import atomic_torch_save, save_detector

REPO = Path(__file__).resolve().parents[1]


def base_spec(tmp_path: Path) -> dict:
    return {
        "name": "t",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 4, "num_val": 2, "input_size": 128},
        "teacher": {"model": {"kind": "retinanet", "backbone": {"name": "convnet", "width": 0.5}}, "epochs": 1},
        "student": {"model": {"kind": "retinanet", "backbone": {"name": "convnet", "width": 0.25}}, "epochs": 1},
        "search": {"space": str(REPO / "search_spaces" / "skeleton.yaml"), "trials": 2},
        "output_dir": str(tmp_path / "runs"),
    }


def write(tmp_path: Path, spec: dict, text: str | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


SIZE = 128
CLASSES = ["ship", "plane"]


def model_spec(width: float, kind: str = "retinanet") -> dict:
    return {
        "kind": kind,
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": width, "depth": 1},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }


def rkd_main(argv: list[str]) -> int:
    """``rkd.cli.main``, or the deploy commands alone until the lead wires them into rkd.cli."""
    if "add_commands" in inspect.getsource(rkd.cli):
        return rkd.cli.main(argv)
    import argparse

    from rkd.deploy.cli import add_commands

    parser = argparse.ArgumentParser(prog="rkd")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RkdError as err:
        print(f"rkd: error: {err}", file=sys.stderr)
        return err.exit_code


# (trial id, status, mAP50, GFLOPs, width, kind); c and d are dominated or not complete
TRIALS = [
    ("t_small", "complete", 0.30, 0.10, 0.25, "retinanet"),
    ("t_mid", "complete", 0.50, 0.20, 0.5, "fcos"),
    ("t_big", "complete", 0.60, 0.40, 0.75, "retinanet"),
    ("t_dominated", "complete", 0.20, 0.30, 0.5, "retinanet"),
    ("t_failed", "failed", None, 0.15, 0.5, "retinanet"),
]


def make_run(root: Path) -> Path:
    run = root / "runs" / "demo"
    rows = []
    torch.manual_seed(0)
    teacher_ckpt = run / "teacher" / "teacher.pt"
    save_detector(teacher_ckpt, build_detector(model_spec(1.0), 2), model_spec(1.0), CLASSES, SIZE)
    for trial_id, status, map50, gflops, width, kind in TRIALS:
        ckpt = run / "ray" / "trials" / f"trial-{trial_id}" / "checkpoint_000000" / "student.pt"
        model = build_detector(model_spec(width, kind), len(CLASSES))
        save_detector(ckpt, model, model_spec(width, kind), CLASSES, SIZE, meta={"map50": map50})
        # the KD-only parts a distilled student leaves beside it
        atomic_torch_save({"adapters.0.weight": torch.randn(16, 16, 1, 1)}, ckpt.parent / "kd_parts.pt")
        params = {"student.model.backbone.width": width, "methods.fitnet": True, "methods.fitnet.weight": 2.0}
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "reason": None if status == "complete" else "boom",
                "map50": map50,
                "gflops": gflops,
                "params_m": 0.1,
                "epochs_done": 1,
                "epochs": 1,
                "kd_methods": "fitnet",
                "wall_s": 1.0,
                "checkpoint": str(ckpt) if status == "complete" else None,
                "config_json": json.dumps(params, sort_keys=True),
                "params": params,
            }
        )
    write_parquet(trials_table(rows), run / "trials.parquet")
    summary = {
        "name": "demo",
        "teacher": {
            "checkpoint": str(teacher_ckpt),
            "map50": 0.7,
            "gflops": 1.5,
            "params": 1,
            "source": "trained",
            "config_hash": "abc",
            "wall_s": 1.0,
        },
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def rows_of(run: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run / "trials.parquet").to_pylist()
