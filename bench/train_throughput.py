"""Training throughput of the Ray Train loop: images/s with 1 worker against 2 DDP workers.

Each worker gets 1 CPU and 1 torch thread and the same per-worker batch, so 2 workers train a
global batch twice as large (weak scaling); the figure is the loop's own ``images_per_s`` (all
ranks' training images over the epoch's wall-clock, evaluation not included), median over the
epochs after the first (warm-up). The runs go one after the other on an embedded Ray.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py --epochs 4 --size 256 --batch 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile

import torch

from rkd.data.dataset import validate_data_spec
from rkd.models import validate_model_spec
from rkd.train.artifacts import read_history
from rkd.train.config import make_loop_config
from rkd.train.runner import ensure_ray, run_training
from rkd.train.spec import Resources

MODEL = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.5},
    "neck": {"channels": 32},
    "head": {"convs": 1},
}


def measure(workers: int, args: argparse.Namespace, storage: str) -> tuple[float, list[float]]:
    data = validate_data_spec(
        {"format": "synthetic", "num_classes": 3, "num_train": args.images, "num_val": 2, "input_size": args.size}
    )
    train = {
        "model": validate_model_spec(MODEL),
        "epochs": args.epochs,
        "batch_size": args.batch,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 1.0,
        "grad_clip": 10.0,
        "eval_every": 0,
        "methods": {},
    }
    config = make_loop_config(data, train, seed=0, threads=1)
    outcome = run_training(config, Resources(workers=workers, cpus_per_worker=1), storage, f"throughput-{workers}")
    per_epoch = [float(row["images_per_s"]) for row in read_history(outcome.checkpoint_dir)]
    return statistics.median(per_epoch[1:] or per_epoch), per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=64, help="synthetic training images")
    parser.add_argument("--size", type=int, default=256, help="input size (px)")
    parser.add_argument("--batch", type=int, default=4, help="per-worker batch")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"GPU: {torch.cuda.is_available()}"
    )
    ensure_ray(None, num_cpus=2)
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        for workers in (1, 2):
            results[workers] = measure(workers, args, storage)
    print("| workers | global batch | images/s (median, epochs 2+) | per epoch |")
    print("|---|---|---|---|")
    for workers, (median, per_epoch) in results.items():
        print(f"| {workers} | {workers * args.batch} | {median:.1f} | {', '.join(f'{x:.1f}' for x in per_epoch)} |")
    print(f"speed-up 2 vs 1 workers: {results[2][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()
