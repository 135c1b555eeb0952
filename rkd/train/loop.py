"""The training loop each Ray Train worker runs: teacher training and distillation alike.

The loop is a plain function of a JSON-able config (see :func:`make_loop_config`)
so it runs unchanged on one process, on N DDP workers of one machine, or across
nodes. The frozen teacher is replicated on every worker and never wrapped in
DDP: it has no trainable parameters, so nothing of it is synchronised.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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
) -> dict[str, Any]:
    """The config :func:`train_loop` takes (plain data only, so Ray can ship it)."""
    return {
        "data": data,
        "train": train,
        "seed": seed,
        "threads": threads,
        "teacher_checkpoint": teacher_checkpoint,
        "extra_metrics": extra_metrics or {},
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

    step, nonfinite_steps, map50 = 0, 0, 0.0
    for epoch in range(epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
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
        last = epoch + 1 == epochs
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            map50 = evaluate(student, val_set, len(class_names), batch_size).map
        metrics = {k: v / max(1, seen) for k, v in sums.items()}
        metrics.update(
            epoch=epoch + 1,
            epochs=epochs,
            map50=float(map50),
            images_per_s=seen * world / max(elapsed, 1e-9),
            lr=optimizer.param_groups[0]["lr"],
            nonfinite_steps=nonfinite_steps,
            **cfg.get("extra_metrics", {}),
        )
        _report(metrics, rank, last, student, distiller, train_cfg, class_names, data_spec)


def _report(
    metrics: dict[str, Any],
    rank: int,
    last: bool,
    student: nn.Module,
    distiller: Distiller | None,
    train_cfg: dict[str, Any],
    class_names: list[str],
    data_spec: dict[str, Any],
) -> None:
    """Every rank reports (Train needs the same number of calls); rank 0 adds the checkpoint."""
    if not (last and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_detector(
            Path(tmp) / STUDENT_FILE,
            student,
            train_cfg["model"],
            class_names,
            int(data_spec["input_size"]),
            meta={"map50": metrics["map50"], "epochs": metrics["epochs"]},
        )
        if distiller is not None:
            atomic_torch_save({k: v.detach().cpu() for k, v in distiller.state_dict().items()}, Path(tmp) / KD_PARTS_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
