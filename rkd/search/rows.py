"""One row per finished trial: its status, scores, KD methods, checkpoint and parameters.

:func:`collect_rows` reads them from Tune's results (:func:`trial_status` says what became of a
trial); :func:`label_references` and :func:`mark_collapsed` complete them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkd import storage
from rkd.metrics import metric_label
from rkd.search.results import error_reason, loss_growth, no_kd_rows
from rkd.train.checkpoint import STUDENT_FILE


def label_references(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> None:
    """Set ``reference`` on the rows whose configuration is one of the named reference points."""
    for row in rows:
        params = row.get("params") or {}
        row["reference"] = next(
            (name for name, point in references.items() if all(params.get(k) == v for k, v in point.items())), None
        )


def trial_status(result: Any) -> tuple[str, str | None]:
    """What became of a trial, from its Tune result: ``(status, reason)``, the status one of
    :data:`rkd.search.results.STATUSES`."""
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
    reference = next(iter(no_kd_rows(rows, accuracy)), None)
    if reference is None or not reference[accuracy] > 0:
        return
    for row in rows:
        if row["status"] == "complete" and row.get(accuracy) == 0:
            row.update(
                status="diverged",
                checkpoint=None,
                reason=(
                    f"diverged: val {metric_label(accuracy)} 0 after training, the no-KD reference "
                    f"{reference['trial_id']} reaches {reference[accuracy]:.3f}"
                ),
            )


def collect_rows(grid: Any, storage_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per trial. ``storage_uri``: the Ray storage URI, so checkpoint paths are recorded as URIs."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        status, reason = trial_status(result)
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
