"""The training loop each Ray Train worker runs: teacher training and distillation alike.

The loop is a plain function of a JSON-able config (see :func:`make_loop_config`)
so it runs unchanged on one process, on N DDP workers of one machine, or across
nodes. The frozen teacher is replicated on every worker and never wrapped in
DDP: it has no trainable parameters, so nothing of it is synchronised.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from rkd.data.dataset import build_dataset, collate_detection
from rkd.distill.distiller import Distiller, build_distiller, nonfinite_terms
from rkd.models import build_detector
from rkd.outputs import Targets
from rkd.train.checkpoint import atomic_torch_save, load_detector, save_detector
from rkd.train.evaluate import evaluate

STUDENT_FILE = "student.pt"
KD_PARTS_FILE = "kd_parts.pt"
TRAIN_STATE_FILE = "train_state.pt"
MAX_NONFINITE_STEPS = 5


class DivergenceError(RuntimeError):
    """Training produced non-finite losses too often; the trial ends as ``diverged``."""


class StudentWithKD(nn.Module):
    """The student plus the learnable KD parts, trained (and DDP-wrapped) as one module.

    The forward runs the student and the distiller together so DDP sees every
    parameter that receives a gradient in one call.
    """

    def __init__(self, student: nn.Module, distiller: Distiller | None) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, images: Tensor, targets: Targets, teacher_out: Any, epoch: float) -> dict[str, Tensor]:
        out = self.student(images, targets)
        terms = {f"gt.{k}": v for k, v in out.losses.items()}
        if self.distiller is not None and teacher_out is not None:
            terms.update({f"kd.{k}": v for k, v in self.distiller(out, teacher_out, targets, epoch).items()})
        return terms


def make_loop_config(
    data: dict[str, Any],
    train: dict[str, Any],
    seed: int,
    threads: int,
    teacher_checkpoint: str | None = None,
    extra_metrics: dict[str, Any] | None = None,
    progress_file: str | None = None,
) -> dict[str, Any]:
    """The config :func:`train_loop` takes (plain data only, so Ray can ship it).

    ``progress_file``: rank 0 appends one JSON line of metrics per epoch to it, for
    the driver to show (workers' stdout is not forwarded: Ray's own logs drown it).
    """
    return {
        "data": data,
        "train": train,
        "seed": seed,
        "threads": threads,
        "teacher_checkpoint": teacher_checkpoint,
        "extra_metrics": extra_metrics or {},
        "progress_file": progress_file,
    }


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the base rate.

    >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.05]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker entry point (also callable directly without Ray for debugging)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    train_cfg, data_spec = cfg["train"], cfg["data"]
    generator = seed_everything(int(cfg["seed"]) + rank)
    device = ray.train.torch.get_device()

    train_set = build_dataset(data_spec, "train", train=True)
    val_set = build_dataset(data_spec, "val", train=False)
    class_names = list(train_set.class_names)
    batch_size = int(train_cfg["batch_size"])
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=int(cfg["seed"]))
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, collate_fn=collate_detection, drop_last=False)

    student = build_detector(train_cfg["model"], len(class_names))
    teacher, distiller = None, None
    if cfg.get("teacher_checkpoint"):
        teacher, _ = load_detector(Path(cfg["teacher_checkpoint"]))
        teacher.to(device).eval().requires_grad_(False)
        if train_cfg.get("methods"):
            distiller = build_distiller(train_cfg["methods"], student.info, teacher.info)
    model = StudentWithKD(student, distiller)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]))
    epochs = int(train_cfg["epochs"])
    steps_per_epoch = max(1, len(loader))
    total_steps = epochs * steps_per_epoch
    warmup = int(round(float(train_cfg.get("warmup_epochs", 1.0)) * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, max(1, warmup)))
    eval_every = int(train_cfg.get("eval_every", 0))

    step, nonfinite_steps, map50, start_epoch, val_images = 0, 0, 0.0, 0, 0
    history: list[dict[str, Any]] = []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        # Continue a killed or failed run where its last checkpoint left it.
        with resumed.as_directory() as folder:
            state = torch.load(Path(folder) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
            student.load_state_dict(torch.load(Path(folder) / STUDENT_FILE, map_location="cpu", weights_only=True)["state_dict"])
        if distiller is not None and state.get("kd_parts"):
            distiller.load_state_dict(state["kd_parts"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, map50 = int(state["epoch"]), int(state["step"]), float(state["map50"])
        nonfinite_steps, history = int(state["nonfinite_steps"]), list(state["history"])
        generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])

    for epoch in range(start_epoch, epochs):
        shard: list[int] = []
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
            shard = list(sampler)  # deterministic for a given epoch: the order the loader will use
        model.train()
        sums: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        for images, targets, _ in loader:
            images, targets = images.to(device), targets.to(device)
            teacher_out = None
            if teacher is not None and distiller is not None:
                with torch.no_grad():
                    teacher_out = teacher(images)
            terms = model(images, targets, teacher_out, epoch + step / total_steps)
            bad = nonfinite_terms(terms)
            if bad:
                # Skip the step, but stop a run that keeps producing NaN/inf.
                nonfinite_steps += 1
                if nonfinite_steps > MAX_NONFINITE_STEPS:
                    raise DivergenceError(f"non-finite loss terms {bad} in {nonfinite_steps} steps")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step()
                continue
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if float(train_cfg.get("grad_clip", 0)) > 0:
                torch.nn.utils.clip_grad_norm_(params, float(train_cfg["grad_clip"]))
            optimizer.step()
            scheduler.step()
            step += 1
            seen += images.shape[0]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * images.shape[0]
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * images.shape[0]
        elapsed = time.perf_counter() - start
        if seen == 0 and len(loader) > 0:
            raise DivergenceError(f"no finite step in epoch {epoch + 1}: non-finite loss terms {bad}")
        last = epoch + 1 == epochs
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            scored = evaluate(student, val_set, len(class_names), batch_size)
            map50, val_images = scored.map, scored.num_images
        metrics = _reduce_means(sums, seen, world)
        if world > 1:
            metrics.update(_shard_coverage(shard, world))
        metrics.update(
            epoch=epoch + 1,
            epochs=epochs,
            map50=float(map50),
            val_images=val_images,
            images_per_s=seen * world / max(elapsed, 1e-9),
            lr=optimizer.param_groups[0]["lr"],
            nonfinite_steps=nonfinite_steps,
            epoch_s=elapsed,
            start_epoch=start_epoch,  # > 0 when this process resumed from a checkpoint
            **cfg.get("extra_metrics", {}),
        )
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        if rank == 0 and cfg.get("progress_file"):
            _append_line(Path(cfg["progress_file"]), history[-1])
        state = {
            "epoch": epoch + 1,
            "step": step,
            "map50": float(map50),
            "nonfinite_steps": nonfinite_steps,
            "history": history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler_rng": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "kd_parts": {k: v.detach().cpu() for k, v in distiller.state_dict().items()} if distiller else {},
        }
        _report(metrics, rank, student, distiller, state, train_cfg, class_names, data_spec)
    if start_epoch >= epochs and history:
        # Resumed a run whose training had already finished: report its last state again
        # so the caller gets the final metrics and checkpoint.
        ray.train.report(history[-1], checkpoint=resumed if rank == 0 else None)


def _reduce_means(sums: dict[str, float], seen: int, world: int) -> dict[str, float]:
    """Per-image means of the loss terms over the images of ALL ranks (not just rank 0's)."""
    keys = sorted(sums)
    if world == 1:
        return {k: sums[k] / max(1, seen) for k in keys}
    packed = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64)
    torch.distributed.all_reduce(packed)
    return {k: float(packed[i] / max(1.0, float(packed[-1]))) for i, k in enumerate(keys)}


def _shard_coverage(shard: list[int], world: int) -> dict[str, int]:
    """How the epoch's training images were spread over ranks (and ranks over nodes)."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (ray.get_runtime_context().get_node_id(), shard))
    seen = [i for _, part in gathered for i in part]
    return {
        "shard_unique": len(set(seen)),
        "shard_total": len(seen),
        "shard_overlap": len(seen) - len(set(seen)),
        "nodes": len({node for node, _ in gathered}),
    }


def _append_line(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _report(
    metrics: dict[str, Any],
    rank: int,
    student: nn.Module,
    distiller: Distiller | None,
    state: dict[str, Any],
    train_cfg: dict[str, Any],
    class_names: list[str],
    data_spec: dict[str, Any],
) -> None:
    """Every rank reports each epoch (Train needs the same number of calls); rank 0 adds a checkpoint.

    A checkpoint holds the student alone (``student.pt``, what export reads), the
    learnable KD parts apart (``kd_parts.pt``) and the training state needed to
    resume (``train_state.pt``: optimizer, scheduler, epoch, RNG, metrics history).
    """
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_detector(
            Path(tmp) / STUDENT_FILE,
            student,
            train_cfg["model"],
            class_names,
            int(data_spec["input_size"]),
            meta={"map50": metrics["map50"], "epoch": metrics["epoch"], "epochs": metrics["epochs"]},
        )
        if distiller is not None:
            atomic_torch_save(state["kd_parts"], Path(tmp) / KD_PARTS_FILE)
        atomic_torch_save(state, Path(tmp) / TRAIN_STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
