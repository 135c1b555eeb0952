"""What a finished training run leaves behind: checkpoint files in a stage folder and metrics.parquet."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rkd.atomic import atomic_copy
from rkd.train.checkpoint import KD_PARTS_FILE, STUDENT_FILE, TRAIN_STATE_FILE, atomic_write_bytes
from rkd.train.runner import TrainOutcome


def read_history(checkpoint_dir: str) -> list[dict[str, Any]]:
    """Per-epoch metrics saved in a run's checkpoint (all epochs so far)."""
    state = torch.load(Path(checkpoint_dir) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    return list(state["history"])


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """``metrics.parquet``: one row per epoch; columns are the union of the reported keys."""
    keys = sorted({k for row in history for k in row})
    table = pa.table({k: [row.get(k) for row in history] for k in keys})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def collect_stage(outcome: TrainOutcome, folder: Path) -> list[dict[str, Any]]:
    """Copy the final checkpoint files into ``folder`` (each atomically) and write metrics.parquet."""
    if outcome.checkpoint_dir is None:
        raise RuntimeError("the training run finished without a checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (STUDENT_FILE, KD_PARTS_FILE):
        src = Path(outcome.checkpoint_dir) / name
        if src.is_file():
            atomic_copy(src, folder / name)
    history = read_history(outcome.checkpoint_dir)
    write_metrics(history, folder / "metrics.parquet")
    return history
