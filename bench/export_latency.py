"""Latency of the quickstart student: eager PyTorch vs its end-to-end ONNX graph in onnxruntime.

Same process, same machine, back to back: the two are interleaved run by run (batch 1, random
input, median of 30 each after 3 warm-up runs), so a change in machine load hits both alike.
The student is examples/quickstart.yaml's (randomly initialised: the time does not depend on the
weights). Usage: python bench/export_latency.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from rkd.deploy.graphs import DetectionNetwork, output_names
from rkd.deploy.latency import ort_session
from rkd.deploy.writers import write_onnx
from rkd.models import build_detector

SIZE, RUNS, WARMUP = 256, 30, 3
SPEC = {
    "kind": "retinanet",
    "boxes": "obb",
    "backbone": {"name": "convnet", "width": 0.5, "depth": 1},
    "neck": {"channels": 32},
    "head": {"convs": 1},
}


def main() -> None:
    torch.manual_seed(0)
    model = build_detector(SPEC, 3).eval()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    write_onnx(DetectionNetwork(model, SIZE).eval(), SIZE, path, output_names(model.info))
    session = ort_session(path, threads=threads)
    x = torch.randn(1, 3, SIZE, SIZE)
    feed = {"images": x.numpy()}
    eager, onnx = [], []
    with torch.no_grad():
        for i in range(WARMUP + RUNS):
            start = time.perf_counter()
            model(x)
            middle = time.perf_counter()
            session.run(None, feed)
            end = time.perf_counter()
            if i >= WARMUP:
                eager.append((middle - start) * 1e3)
                onnx.append((end - middle) * 1e3)
    print(f"eager torch {torch.__version__} (network forward only): {statistics.median(eager):.2f} ms")
    print(f"onnxruntime {ort.__version__} CPU (network + decode + top-k): {statistics.median(onnx):.2f} ms")
    print(f"batch 1, {SIZE}x{SIZE}, {threads} threads, median of {RUNS}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
