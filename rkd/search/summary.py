"""A search's result files: ``trials.parquet``, ``pareto.parquet``, ``pareto.png``, ``summary.json``,
and the label lines ``data.on_error: skip`` left out (``skipped_lines.txt``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rkd.data.dataset import SKIPPED_FILE, write_skipped
from rkd.search.headroom import teacher_headroom
from rkd.search.plot import plot_front
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows, hypervolume_of, knee, trials_table, write_parquet
from rkd.train.checkpoint import atomic_write_json
from rkd.train.spec import RunSpec


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
    plot_front(
        rows,
        front,
        run_dir / "pareto.png",
        teacher,
        f"rkd search: {spec.name}",
        latency=latency,
        accuracy=objectives[0],
        confirmed=(confirm or {}).get("points"),
    )
    # Reference point: no accuracy, 10% above the largest cost seen (the teacher's GFLOPs included).
    ref = {objectives[0]: 0.0}
    for key in objectives[1:]:
        seen = [r[key] for r in rows if r.get(key) is not None] + ([teacher[key]] if teacher.get(key) else [])
        ref[key] = max(seen, default=1.0) * 1.1
    ref_point = [ref[k] for k in objectives]
    summary = {
        "name": spec.name,
        "teacher": teacher,
        "teacher_headroom": teacher_headroom(teacher, rows, objectives[0]),
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
