"""Wall-clock inference latency of a model at batch 1."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def measure_latency(model: nn.Module, input_size: int, runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(images)`` for one ``(1, 3, input_size, input_size)`` image.

    Runs in eval mode under ``no_grad`` on the model's device (synchronising
    CUDA around each run); the model's train/eval mode is restored afterwards.
    Detectors are called without targets, so the time excludes decoding/NMS.

    >>> measure_latency(nn.Conv2d(3, 4, 3), 16, runs=3, warmup=1) > 0
    True
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    images = torch.randn(1, 3, input_size, input_size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + runs):
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)
