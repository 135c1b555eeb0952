"""Training-loader throughput on DOTA-size scenes: patches per second, today's path against the new one.

Scenes of 4000 x 4000 px are built by laying UCAS-AOD images of ``../shared/data/ucas50`` side by
side, written as PNG to a temporary folder (never into the repository), and cut into 1024 px
patches with 200 px overlap (25 per scene). The patches go through the training path: the tiled
dataset (letterbox to ``--size``, random flips), the DataLoader and the collation; the labels are
empty, since objects are cut from the scene when the dataset is built, not per sample.

- today: every patch decodes its whole scene (no patch cache), loading in the training process.
  ``--today-only`` measures just this row with the rkd on ``PYTHONPATH``, so it can be run against
  the code before the change (``git archive <commit> rkd | tar -x -C DIR``; ``PYTHONPATH=DIR``).
- new, cold: the first epoch with an empty patch cache (a scene is decoded once, all its patches kept).
- new, warm: later epochs, patches read from the cache; 0, 1 and 2 loader worker processes.
- ``--train-step``: the warm rows again with a training step of a small RetinaNet on every batch
  (``--threads`` torch threads), the case where a loader worker can overlap loading with compute.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader_throughput.py --scenes 4 --size 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from rkd.data.dataset import DetectionDataset, collate_detection
from rkd.data.images import read_rgb
from rkd.data.sample import DetectionRecord, empty_targets
from rkd.data.tiling import tile_records

UCAS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ucas50"
SCENE = 4000


def build_scenes(folder: Path, count: int) -> list[DetectionRecord]:
    """``count`` 4000 x 4000 PNG scenes tiled from the UCAS images, as label-less records."""
    sources = sorted((UCAS / "images").rglob("*.png")) or sorted(UCAS.rglob("*.png"))
    records, k = [], 0
    for n in range(count):
        canvas = np.zeros((SCENE, SCENE, 3), np.uint8)
        y = 0
        while y < SCENE:
            x, row = 0, 0
            while x < SCENE:
                image = read_rgb(sources[k % len(sources)])
                k += 1
                h, w = min(image.shape[0], SCENE - y), min(image.shape[1], SCENE - x)
                canvas[y : y + h, x : x + w] = image[:h, :w]
                x, row = x + w, max(row, h)
            y += row
        path = folder / f"scene{n}.png"
        Image.fromarray(canvas).save(path)
        boxes, labels, difficult = empty_targets()
        records.append(DetectionRecord(path.stem, (SCENE, SCENE), boxes, labels, difficult, image_path=path))
    return records


def today_loader(records: list[DetectionRecord], args: argparse.Namespace) -> DataLoader:
    """The loader as rkd built it before the patch cache (only calls that existed then)."""
    dataset = DetectionDataset(tile_records(records, 1024, 200), args.size, True, ["object"])
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=args.batch, sampler=sampler, collate_fn=collate_detection)


def new_loader(records: list[DetectionRecord], workers: int, args: argparse.Namespace):
    from rkd.data.loading import EpochIndices, SeededSamples, loader_options

    patches = tile_records(records, 1024, 200, patch_cache=True)
    dataset = DetectionDataset(patches, args.size, True, ["object"], memory_bytes=0)  # the disk path, not RAM
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    indices = EpochIndices(sampler) if workers else sampler
    loaded = SeededSamples(dataset, 0) if workers else dataset
    options = loader_options(workers, torch.device("cpu"))
    return DataLoader(loaded, batch_size=args.batch, sampler=indices, collate_fn=collate_detection, **options), indices


def timed(batches, limit: int | None = None, step=None) -> tuple[float, int]:
    """Patches per second over ``batches`` (stopping after ``limit`` patches), ``step(batch)`` on each."""
    start, seen = time.perf_counter(), 0
    for images, targets, _ in batches:
        if step is not None:
            step(images, targets)
        seen += images.shape[0]
        if limit is not None and seen >= limit:
            break
    return seen / (time.perf_counter() - start), seen


def train_step():
    """One AdamW step of a small RetinaNet (convnet w0.5) on a batch: a stand-in for training."""
    from rkd.models import build_detector

    model = build_detector(
        {
            "kind": "retinanet",
            "backbone": {"name": "convnet", "width": 0.5},
            "neck": {"channels": 32},
            "head": {"convs": 1},
        },
        1,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, targets) -> None:
        loss = sum(model(images, targets).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="letterboxed input size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--today-patches", type=int, default=16, help="patches timed on today's (slow) path")
    parser.add_argument("--today-only", action="store_true", help="only today's row (runs on older rkd code)")
    parser.add_argument("--train-step", action="store_true", help="time warm epochs with a training step per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rkd-loader-bench-") as tmp:
        os.environ["RKD_PATCH_CACHE"] = str(Path(tmp) / "patch-cache")
        records = build_scenes(Path(tmp), args.scenes)
        total = 25 * args.scenes
        print(
            f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.scenes} scenes "
            f"{SCENE}x{SCENE} PNG ({records[0].image_path.stat().st_size / 1e6:.1f} MB each), {total} patches "
            f"of 1024 px, input {args.size}, batch {args.batch}"
        )
        rows = []
        today, seen = timed(today_loader(records, args), args.today_patches)
        rows.append(("today: whole scene decoded per patch, 0 workers", today, seen))
        for workers in () if args.today_only else (0, 1, 2):
            os.environ["RKD_PATCH_CACHE"] = str(Path(tmp) / f"patch-cache-{workers}")  # cold for each count
            batches, indices = new_loader(records, workers, args)
            cold, seen = timed(batches)
            rows.append((f"new, cold cache (first epoch), {workers} workers", cold, seen))
            warm = []
            for epoch in (1, 2):
                if workers:
                    indices.epoch = epoch
                warm.append(timed(batches))
            rows.append(
                (
                    f"new, warm cache (epochs 2-3), {workers} workers",
                    float(np.mean([w for w, _ in warm])),
                    sum(n for _, n in warm),
                )
            )
            del batches
        if args.train_step:
            step = train_step()
            for workers in (0, 1, 2):
                batches, indices = new_loader(records, workers, args)  # the cache is warm by now
                timed(batches, 8, step)  # workers started, model warmed up
                if workers:
                    indices.epoch = 1
                rate, seen = timed(batches, None, step)
                rows.append((f"new, warm, with a training step, {workers} workers", rate, seen))
                del batches
        print("| loader | patches/s | patches timed | vs today |\n|---|---|---|---|")
        for name, rate, seen in rows:
            print(f"| {name} | {rate:.1f} | {seen} | {rate / today:.1f}x |")


if __name__ == "__main__":
    main()
