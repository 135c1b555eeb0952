"""Search results: the trials table, the Pareto front, its plot and its printed table.

Only fully trained trials (status ``complete``) can enter the front: a trial
that was stopped early, failed, diverged or was infeasible has truncated or no
metrics, and must never look like a trade-off the user can pick.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rkd.train.checkpoint import atomic_write_bytes

STATUSES = ("complete", "stopped", "failed", "diverged", "infeasible")
BASE_COLUMNS = [
    "trial_id",
    "status",
    "reason",
    "map50",
    "gflops",
    "params_m",
    "epochs_done",
    "epochs",
    "kd_methods",
    "wall_s",
    "checkpoint",
    "config_json",
]


def pareto_mask(map50: np.ndarray, gflops: np.ndarray) -> np.ndarray:
    """Non-dominated points for (max mAP, min GFLOPs); exact duplicates both stay on the front.

    >>> pareto_mask(np.array([0.5, 0.6, 0.4]), np.array([1.0, 2.0, 1.5])).tolist()
    [True, True, False]
    """
    if len(map50) == 0:
        return np.zeros(0, dtype=bool)
    points = np.column_stack([map50, gflops]).astype(float)
    return np.asarray(moocore.is_nondominated(points, maximise=[True, False], keep_weakly=True), dtype=bool)


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


def front_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete trials on the Pareto front, sorted by GFLOPs."""
    done = [r for r in rows if r["status"] == "complete" and _finite(r.get("map50")) and _finite(r.get("gflops"))]
    if not done:
        return []
    mask = pareto_mask(np.array([r["map50"] for r in done]), np.array([r["gflops"] for r in done]))
    return sorted((r for r, m in zip(done, mask) if m), key=lambda r: (r["gflops"], -r["map50"]))


def knee(front: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The front point farthest from the line joining its two ends (after normalising both axes)."""
    if len(front) < 3:
        return front[-1] if front else None
    x = np.array([r["gflops"] for r in front], dtype=float)
    y = np.array([r["map50"] for r in front], dtype=float)
    x = (x - x.min()) / max(np.ptp(x), 1e-12)
    y = (y - y.min()) / max(np.ptp(y), 1e-12)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    dist = np.abs(dy * x - dx * y + x[-1] * y[0] - y[-1] * x[0]) / max(math.hypot(dx, dy), 1e-12)
    return front[int(dist.argmax())]


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


def plot_front(
    rows: list[dict[str, Any]],
    front: list[dict[str, Any]],
    path: Path,
    teacher: dict[str, Any] | None,
    title: str,
) -> None:
    """``pareto.png``: all complete trials, the front highlighted, teacher and no-KD students marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = [r for r in rows if r["status"] == "complete"]
    kd = [r for r in done if r.get("kd_methods")]
    plain = [r for r in done if not r.get("kd_methods")]
    ax.scatter([r["gflops"] for r in kd], [r["map50"] for r in kd], c="#9aa5b1", s=28, label="distilled trials")
    if plain:
        ax.scatter(
            [r["gflops"] for r in plain], [r["map50"] for r in plain], marker="s", c="#e08a00", s=42, label="student, no KD"
        )
    if front:
        ax.plot([r["gflops"] for r in front], [r["map50"] for r in front], "-o", c="#1f6feb", lw=1.8, ms=6, label="Pareto front")
    if teacher is not None:
        ax.scatter([teacher["gflops"]], [teacher["map50"]], marker="*", c="#c62828", s=160, label="teacher", zorder=5)
    ax.set_xlabel("student GFLOPs (lower is better)")
    ax.set_ylabel("val mAP50 (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
