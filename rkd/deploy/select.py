"""Picking the student to export from a finished search: its trial (``best``, ``knee`` or an id,
within the user's limits), that trial's checkpoint, and the student rebuilt from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkd import storage
from rkd.errors import RkdError
from rkd.metrics import metric_label
from rkd.models import Classifier
from rkd.models.detector import Detector
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows, knee, trials_path
from rkd.train.checkpoint import read_checkpoint


def read_run(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``RUN/trials.parquet`` and ``RUN/summary.json`` (``{}`` if absent)."""
    import pyarrow.parquet as pq

    path = trials_path(run)  # says when the folder's search is unfinished rather than absent
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # a torn or foreign file
        raise RkdError(f"{path}: cannot read the trials table ({type(exc).__name__}: {exc})") from None
    summary_path = run / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise RkdError(f"{summary_path}: not valid JSON ({exc})") from None
    return rows, summary


def _within(row: dict[str, Any], accuracy: str, min_map: float | None, max_gflops: float | None) -> bool:
    return (min_map is None or row[accuracy] >= min_map) and (max_gflops is None or row["gflops"] <= max_gflops)


def _describe(rows: list[dict[str, Any]], accuracy: str) -> str:
    return ", ".join(f"{r['trial_id']} ({_scores(r, accuracy)})" for r in rows) or "none"


def _scores(row: dict[str, Any], accuracy: str) -> str:
    return f"{metric_label(accuracy)} {row[accuracy]:.3f}, {row['gflops']:.3f} GFLOPs"


def pick_trial(
    rows: list[dict[str, Any]],
    pick: str = "best",
    min_map: float | None = None,
    max_gflops: float | None = None,
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES,
    confirmed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The trial to export: ``best`` (highest accuracy), ``knee``, or a trial id, within the constraints.

    The accuracy is the first of ``objectives`` (``map50`` for detection runs, ``top1`` for
    classification runs); ``min_map`` is the minimum of that accuracy.
    ``best`` and ``knee`` choose among the complete trials on the Pareto front;
    an explicit trial id may be any complete trial.
    ``confirmed``: the search's confirm stage (``summary.json: confirm.points``). Where one of its
    points is within the constraints, ``best`` is the one with the highest *confirmed* accuracy (the
    mean over the confirm seeds): the search's own score is its best seed's, and so optimistic.
    """
    accuracy = objectives[0]
    label = metric_label(accuracy)
    limits = " and ".join(
        [f"{label} >= {min_map}"] * (min_map is not None) + [f"GFLOPs <= {max_gflops}"] * (max_gflops is not None)
    )
    front = front_rows(rows, objectives)
    if pick in ("best", "knee"):
        ok = [r for r in front if _within(r, accuracy, min_map, max_gflops)]
        if not ok:
            raise RkdError(
                f"no complete trial on the Pareto front satisfies {limits or 'the constraints'}; "
                f"the front is: {_describe(front, accuracy)}"
            )
        if pick == "knee":
            return knee(ok, accuracy)  # type: ignore[return-value]
        by_id = {r["trial_id"]: r for r in ok}
        sure = [p for p in confirmed or [] if p["trial_id"] in by_id and p["candidate"]["mean"] is not None]
        if sure:
            return by_id[max(sure, key=lambda p: (p["candidate"]["mean"], -by_id[p["trial_id"]]["gflops"]))["trial_id"]]
        return max(ok, key=lambda r: (r[accuracy], -r["gflops"]))
    matches = [r for r in rows if r["trial_id"] == pick]
    if not matches:
        raise RkdError(f"--pick {pick!r}: no such trial; use best, knee or one of {[r['trial_id'] for r in rows]}")
    row = matches[0]
    if row["status"] != "complete" or not row.get("checkpoint"):
        raise RkdError(
            f"trial {pick} is {row['status']} ({row.get('reason') or 'no checkpoint'}); only complete trials export"
        )
    if not _within(row, accuracy, min_map, max_gflops):
        raise RkdError(f"trial {pick} ({_scores(row, accuracy)}) does not satisfy {limits}")
    return row


def resolve_checkpoint(run: Path, recorded: str) -> Path:
    """The trial's ``student.pt``: the recorded path (fetched if it is a storage URI), else the same
    file under ``run`` (a moved or synced run)."""
    if storage.is_uri(recorded):
        return storage.local_copy(recorded)
    path = Path(recorded)
    if path.is_file():
        return path
    # Trial checkpoints live under RUN/ray/...; a run copied from cluster storage keeps that layout.
    parts = path.parts
    if "ray" in parts:
        moved = run.joinpath(*parts[len(parts) - 1 - parts[::-1].index("ray") :])
        if moved.is_file():
            return moved
    raise RkdError(f"{recorded}: the trial's student checkpoint is missing (looked there and under {run})")


def load_student(run: Path, row: dict[str, Any], task: Any) -> tuple[Detector | Classifier, dict[str, Any]]:
    """The trial's student (eval mode) and its checkpoint document."""
    ckpt_path = resolve_checkpoint(run, row["checkpoint"])
    ckpt = read_checkpoint(ckpt_path, task.checkpoint_kind)
    if ckpt["model_spec"].get("kind") == "openmmlab":
        raise RkdError(
            f"{ckpt_path}: exporting OpenMMLab students (kind openmmlab) is not supported; "
            "use MMDeploy on the model's own checkpoint"
        )
    if ckpt["model_spec"].get("kind") == "faster_rcnn":
        # The exported network is backbone + neck + dense head; a two-stage RoI head is not in it.
        raise RkdError(f"{ckpt_path}: exporting two-stage detectors (kind faster_rcnn) is not supported yet")
    try:
        model = task.build_model(ckpt["model_spec"], ckpt["num_classes"])
    except (RkdError, ValueError) as exc:
        raise RkdError(f"{ckpt_path}: the student's model spec does not build ({exc})") from None
    # Strict: a student checkpoint that carried adapters or other KD parts fails here.
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise RkdError(f"{ckpt_path}: weights do not fit the student's model spec: {exc}") from None
    return model.eval(), ckpt
