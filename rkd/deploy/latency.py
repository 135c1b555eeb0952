"""Latency of an exported graph in onnxruntime, stated with its runtime, provider, batch and threads.

The figure is the median of ``runs`` timed ``session.run`` calls (after ``warmup`` untimed ones)
on a random batch; it includes everything in the graph (for an end-to-end detector: network,
decoding, top-k, and NMS for horizontal boxes) but not reading or letterboxing images.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def ort_session(path: Path, provider: str = "CPUExecutionProvider", threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime's own choice
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=[provider])


def ort_latency(
    path: Path,
    size: int,
    batch: int = 1,
    runs: int = 20,
    warmup: int = 3,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
) -> dict[str, Any]:
    """``{"median_ms", "batch", "threads", "runtime", "provider", "runs"}`` of ``path`` at ``batch`` images."""
    import onnxruntime as ort

    from rkd.deploy.postprocess import inputs

    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    threads = threads or os.cpu_count() or 1
    session = ort_session(path, provider, threads)
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    feed = inputs([i.name for i in session.get_inputs()], images)
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 3),
        "batch": batch,
        "threads": threads,
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": provider,
        "runs": runs,
    }


def cuda_available() -> bool:
    """Whether onnxruntime can run on a GPU here (its CUDA provider is installed and a GPU answers)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return True
