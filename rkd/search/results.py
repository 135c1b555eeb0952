"""Search results: the trials table, the Pareto front and its printed table (its plot: :mod:`rkd.search.plot`).

Only fully trained trials (status ``complete``) can enter the front: a trial
that was stopped early, failed, diverged or was infeasible has truncated or no
metrics, and must never look like a trade-off the user can pick.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rkd.atomic import atomic_write_bytes
from rkd.errors import RkdError
from rkd.metrics import metric_label

STATUSES = ("complete", "stopped", "failed", "diverged", "infeasible")
BASE_COLUMNS = [
    "trial_id",
    "status",
    "reason",
    "map50",
    "top1",
    "gflops",
    "latency_ms",
    "params_m",
    "epochs_done",
    "epochs",
    "kd_methods",
    "reference",
    "wall_s",
    "checkpoint",
    "config_json",
]


# What a search can optimise, and which way (True: maximise).
OBJECTIVES = {"map50": True, "top1": True, "gflops": False, "latency_ms": False}
DEFAULT_OBJECTIVES = ("map50", "gflops")
NO_KD = "no KD"  # the reference label of the student trained without KD (search.reference_points)


def no_kd_rows(rows: list[dict[str, Any]], accuracy: str) -> list[dict[str, Any]]:
    """The complete, scored trials of the student without KD, in trial order: the ``no KD`` reference
    point and any trial the searcher sampled with every KD method off (``kd_methods == ""``), which
    is the student alone too, often at another lr or size than the reference's."""
    return [
        r
        for r in rows
        if (r.get("reference") == NO_KD or r.get("kd_methods") == "")
        and r.get("status") == "complete"
        and r.get(accuracy) is not None
    ]


LOSS_GROWTH = 1e3  # a finite loss this many times its start: the run diverged even without a NaN


def loss_growth(metrics: dict[str, Any]) -> str | None:
    """Why a trial that trained to the end diverged anyway (its loss blew up), or None.

    >>> loss_growth({"loss_start": 2.0, "loss": 1.5e12, "epoch": 1})
    'diverged: the loss grew from 2 (first step) to 1.5e+12 (epoch 1)'
    """
    start, last = metrics.get("loss_start"), metrics.get("loss")
    if not all(isinstance(v, (int, float)) for v in (start, last)) or start <= 0 or not last > LOSS_GROWTH * start:
        return None
    return f"diverged: the loss grew from {start:.3g} (first step) to {last:.3g} (epoch {metrics.get('epoch')})"


def trials_path(run: Path) -> Path:
    """``RUN/trials.parquet`` of a finished search; otherwise an :class:`RkdError` saying what ``run`` is."""
    path = Path(run) / "trials.parquet"
    if path.is_file():
        return path
    if (Path(run) / "search_identity.json").is_file() or (Path(run) / "ray" / "search").is_dir():
        raise RkdError(
            f"{run}: the search of this folder is unfinished (interrupted, or still running); "
            "run `rkd search` on its spec again to finish it (it resumes), then ask for its results"
        )
    raise RkdError(f"{path}: no trials table here; is {run} a search run folder (runs/<name>)?")


def nondominated(points: np.ndarray, maximise: list[bool]) -> np.ndarray:
    """Non-dominated rows of ``points`` (one column per objective); exact duplicates all stay.

    >>> nondominated(np.array([[0.5, 1.0, 9.0], [0.6, 2.0, 3.0], [0.4, 1.5, 9.5]]), [True, False, False]).tolist()
    [True, True, False]
    """
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(points.astype(float), maximise=maximise, keep_weakly=True), dtype=bool)


def run_objectives(run_dir: Path) -> tuple[str, ...]:
    """The objectives a finished search optimised (from its ``summary.json``)."""
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        return tuple(json.loads(summary.read_text()).get("objectives", DEFAULT_OBJECTIVES))
    return DEFAULT_OBJECTIVES


def pareto_mask(map50: np.ndarray, gflops: np.ndarray) -> np.ndarray:
    """Non-dominated points for (max mAP, min GFLOPs); exact duplicates both stay on the front.

    >>> pareto_mask(np.array([0.5, 0.6, 0.4]), np.array([1.0, 2.0, 1.5])).tolist()
    [True, True, False]
    """
    return nondominated(np.column_stack([map50, gflops]), [True, False])


def hypervolume(map50: np.ndarray, gflops: np.ndarray, ref_gflops: float) -> float:
    """Area dominated by the points, against the reference (mAP 0, ``ref_gflops``)."""
    keep = gflops <= ref_gflops
    if not keep.any():
        return 0.0
    points = np.column_stack([map50[keep], gflops[keep]]).astype(float)
    return float(moocore.hypervolume(points, ref=[0.0, ref_gflops], maximise=[True, False]))


def trials_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One row per trial: the fixed columns, then one ``param.<name>`` column per searched parameter."""
    param_names = sorted({k for r in rows for k in r.get("params", {})})
    columns: dict[str, list[Any]] = {c: [] for c in BASE_COLUMNS}
    columns.update({f"param.{p}": [] for p in param_names})
    for r in rows:
        for c in BASE_COLUMNS:
            columns[c].append(r.get(c))
        for p in param_names:
            v = r.get("params", {}).get(p)
            columns[f"param.{p}"].append(None if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
    # Mixed-type parameter columns (e.g. a choice of numbers and strings) are stored as strings.
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[name] = pa.array([None if v is None else str(v) for v in values])
    return pa.table(arrays)


def write_parquet(table: pa.Table, path: Path) -> None:
    def write(fh: Any) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fh.write(buf.getvalue())

    atomic_write_bytes(path, write)


def front_rows(rows: list[dict[str, Any]], objectives: tuple[str, ...] = DEFAULT_OBJECTIVES) -> list[dict[str, Any]]:
    """The complete trials on the Pareto front of ``objectives``, sorted by GFLOPs."""
    done = [r for r in rows if r["status"] == "complete" and all(_finite(r.get(k)) for k in objectives)]
    if not done:
        return []
    points = np.array([[r[k] for k in objectives] for r in done], dtype=float)
    mask = nondominated(points, [OBJECTIVES[k] for k in objectives])
    return sorted((r for r, m in zip(done, mask) if m), key=lambda r: (r["gflops"], -r[objectives[0]]))


def hypervolume_of(rows: list[dict[str, Any]], objectives: tuple[str, ...], ref: list[float]) -> float:
    """Hypervolume of the complete trials against ``ref`` (one value per objective)."""
    done = [r for r in rows if r["status"] == "complete" and all(_finite(r.get(k)) for k in objectives)]
    maximise = [OBJECTIVES[k] for k in objectives]
    points = np.array([[r[k] for k in objectives] for r in done], dtype=float).reshape(-1, len(objectives))
    # Only points better than the reference in every objective add volume.
    inside = np.all(np.where(maximise, points >= ref, points <= ref), axis=1)
    if not inside.any():
        return 0.0
    return float(moocore.hypervolume(points[inside], ref=ref, maximise=maximise))


def knee(front: list[dict[str, Any]], accuracy: str = "map50") -> dict[str, Any] | None:
    """The front point farthest from the line joining its two ends (after normalising both axes)."""
    if len(front) < 3:
        return front[-1] if front else None
    x = np.array([r["gflops"] for r in front], dtype=float)
    y = np.array([r[accuracy] for r in front], dtype=float)
    x = (x - x.min()) / max(np.ptp(x), 1e-12)
    y = (y - y.min()) / max(np.ptp(y), 1e-12)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    dist = np.abs(dy * x - dx * y + x[-1] * y[0] - y[-1] * x[0]) / max(math.hypot(dx, dy), 1e-12)
    return front[int(dist.argmax())]


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


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width text table; ``columns`` are (key, header) pairs."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (_, h) in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line([h for _, h in columns]), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")


def error_reason(text: str) -> str:
    """The line of a (Ray-wrapped) traceback that says what went wrong, rkd's own errors first.

    >>> error_reason("Traceback...\\nValueError: inner\\n\\nrkd.errors.SpecError: backbone.weights: cannot load x")
    'rkd.errors.SpecError: backbone.weights: cannot load x'
    """
    lines = text.replace("\\n", "\n").splitlines()
    found = [(i, m) for i, line in enumerate(lines) if (m := _ERROR_LINE.match(line))]
    if not found:
        return text.strip().splitlines()[-1][:500] if text.strip() else "unknown error"
    own = [(i, m) for i, m in found if m.group(1).startswith("rkd.")]
    i, m = (own or found)[-1]
    message = m.group(0).strip()
    if message.endswith(":") and i + 1 < len(lines):  # the message continues on the next line
        message += " " + lines[i + 1].strip()
    return message[:1000]
