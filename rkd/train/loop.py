"""The training loop every training runs, on each Ray Train worker or in-process: teacher and students alike.

The loop is a plain function of a JSON-able config (see :func:`make_loop_config`)
so it runs unchanged on one process, on N DDP workers of one machine, or across
nodes. The frozen teacher is replicated on every worker and never wrapped in
DDP: it has no trainable parameters, so nothing of it is synchronised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from rkd import storage
from rkd.data.dataset import build_dataset, collate_detection
from rkd.distill.distiller import Distiller, build_distiller, nonfinite_terms
from rkd.models import build_detector
from rkd.outputs import Targets
from rkd.errors import RkdError
from rkd.train.checkpoint import atomic_torch_save, load_detector, older_checkpoints, read_checkpoint_files, save_model
from rkd.train.evaluate import evaluate
from rkd.train import session
from rkd.train.prior import attach_prior_states
from rkd.timeline import mark

STUDENT_FILE = "student.pt"
KD_PARTS_FILE = "kd_parts.pt"
TRAIN_STATE_FILE = "train_state.pt"
MAX_NONFINITE_STEPS = 5
# The checkpoint metric Ray ranks by with ``keep: k``: the epoch's val mAP50, or UNSCORED in epochs
# without evaluation, below every mAP, so a carried-over mAP never makes such an epoch look best.
# Not NaN/-inf: Ray's checkpoint snapshot writes those as null and then fails to restore the run.
SCORE_METRIC = "checkpoint_score"
UNSCORED = -1.0

log = logging.getLogger(__name__)


START_STEPS = 1  # steps whose mean loss is reported as loss_start: the first, before any update


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

    def forward(self, images: Tensor, targets: Targets | Tensor, teacher_out: Any, epoch: float) -> dict[str, Tensor]:
        out = self.student(images, targets)
        terms = {f"gt.{k}": v for k, v in out.losses.items()}
        if self.distiller is not None:  # (teacher_out is None for self-distillation, e.g. SSKD)
            task_loss = sum(out.losses.values())  # with its graph: the loss balance measures its gradient
            # KD losses compare small differences of features: always computed in fp32.
            with torch.autocast(images.device.type, enabled=False):
                kd = self.distiller(to_float32(out), to_float32(teacher_out), targets, epoch, task_loss=task_loss)
            terms.update({f"kd.{k}": v for k, v in kd.items()})
        return terms


def to_float32(value: Any) -> Any:
    """``value`` with every reduced-precision floating tensor inside it (dataclass fields, lists,
    tuples, dicts) cast to fp32; everything else unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_float32(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def make_loop_config(
    data: dict[str, Any],
    train: dict[str, Any],
    seed: int,
    threads: int,
    teacher_checkpoint: str | None = None,
    extra_metrics: dict[str, Any] | None = None,
    progress_file: str | None = None,
    prior_states: dict[str, str] | None = None,
    task: str = "detection",
) -> dict[str, Any]:
    """The config :func:`train_loop` takes (plain data only, so Ray can ship it).

    ``task``: ``detection`` (``data`` a detection data section, ``train.model`` a detector) or
    ``classification`` (a scenes data section, a ``kind: classifier`` model, classification KD
    methods; see :mod:`rkd.train.classify`).

    ``progress_file``: rank 0 appends one JSON line of metrics per epoch to it, for
    the driver to show (workers' stdout is not forwarded: Ray's own logs drown it).
    ``prior_states``: per KD method with a prior stage, the cached file of its trained
    prior modules (:func:`rkd.train.prior.prepare_priors`); they are loaded and frozen.
    """
    return {
        "task": task,
        "data": data,
        "train": train,
        "seed": seed,
        "threads": threads,
        "teacher_checkpoint": teacher_checkpoint,
        "extra_metrics": extra_metrics or {},
        "progress_file": progress_file,
        "prior_states": dict(prior_states or {}),
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimiser updates: every parameter that takes a gradient (the student and the
    learnable KD parts), never the frozen teacher or a component's frozen prior-stage modules."""
    return [p for p in model.parameters() if p.requires_grad]


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


def schedule_factor(step: int, steps_per_epoch: int, total: int, warmup: int, train_cfg: dict[str, Any]) -> float:
    """The lr multiplier at ``step``: linear warm-up, then cosine decay (:func:`lr_factor`) or,
    with ``schedule: step``, ``step_gamma`` to the power of the ``step_epochs`` passed.

    >>> cfg = {"schedule": "step", "step_epochs": [2, 3], "step_gamma": 0.1}
    >>> [round(schedule_factor(s, 10, 40, 5, cfg), 4) for s in (0, 9, 19, 20, 29, 30)]
    [0.2, 1.0, 1.0, 0.1, 0.1, 0.01]
    """
    if train_cfg.get("schedule", "cosine") != "step":
        return lr_factor(step, total, warmup)
    if step < warmup:
        return (step + 1) / warmup
    epochs_done = step // max(1, steps_per_epoch)
    passed = sum(1 for e in train_cfg.get("step_epochs", []) if epochs_done >= int(e))
    return float(train_cfg.get("step_gamma", 0.1)) ** passed


def effective_lr(train_cfg: dict[str, Any], world: int) -> float:
    """``lr`` scaled linearly with the global batch when ``lr_reference_batch`` is set.

    >>> effective_lr({"lr": 0.01, "batch_size": 8, "lr_reference_batch": 16}, 4)
    0.02
    >>> effective_lr({"lr": 0.01, "batch_size": 8}, 4)  # no reference: lr as given
    0.01
    """
    reference = train_cfg.get("lr_reference_batch")
    lr = float(train_cfg["lr"])
    return lr if not reference else lr * int(train_cfg["batch_size"]) * world / int(reference)


def epoch_progress(step: int, steps_per_epoch: int) -> float:
    """Epochs done at global ``step`` (0-based, counted over the whole run), with the fraction of the
    current one: what KD components' epoch ramps (NSD's warm-up, DKD's) read.

    >>> [epoch_progress(s, 10) for s in (0, 5, 10, 25)]
    [0.0, 0.5, 1.0, 2.5]
    """
    return step / max(1, steps_per_epoch)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None: plain fp32). ``auto``: bf16 on CUDA only,
    since CPU bf16 kernels are slower than fp32 ones on most machines."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_channels_last(setting: str | bool, device: torch.device, model: nn.Module) -> bool:
    """``auto``: on for convolutional models on CUDA, where cuDNN's NHWC kernels are faster."""
    if setting == "auto":
        return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return bool(setting)


class DetectionTask:
    """What the loop needs to know about detection: data, models, batches, the val score.

    :class:`rkd.train.classify.ClassificationTask` is its scene-classification twin; the
    loop itself (DDP, schedules, precision, checkpoints, resume) is shared.
    """

    metric = "map50"
    kind = "detector"

    def datasets(self, data_spec: dict[str, Any]) -> tuple[Any, Any, list[str], Any]:
        train_set = build_dataset(data_spec, "train", train=True)
        return train_set, build_dataset(data_spec, "val", train=False), list(train_set.class_names), collate_detection

    def models(self, cfg: dict[str, Any], num_classes: int) -> tuple[nn.Module, nn.Module | None, Any]:
        train_cfg = cfg["train"]
        student = build_detector(train_cfg["model"], num_classes)
        teacher, distiller = None, None
        if cfg.get("teacher_checkpoint"):
            teacher, _ = load_detector(storage.local_copy(cfg["teacher_checkpoint"]), keep=True)
            if train_cfg.get("methods"):
                distiller = build_distiller(
                    train_cfg["methods"], student.info, teacher.info, balance=train_cfg.get("kd_balance") or {}
                )
                attach_prior_states(distiller, cfg.get("prior_states"))
        return student, teacher, distiller

    def needs_teacher_output(self, teacher: nn.Module | None, distiller: Any) -> bool:
        return teacher is not None and distiller is not None

    def to_device(self, batch: Any, device: torch.device, memory_format: torch.memory_format) -> tuple[Tensor, Any]:
        images, targets, _ = batch
        return images.to(device, memory_format=memory_format), targets.to(device)

    def score(self, student: nn.Module, val_set: Any, num_classes: int, batch_size: int, device: torch.device,
              rank: int, world: int) -> tuple[float, int]:
        scored = evaluate(student, val_set, num_classes, batch_size)
        return float(scored.map), scored.num_images


def loop_task(name: str) -> Any:
    if name == "classification":
        from rkd.train.classify import ClassificationTask  # the classification side imports this module

        return ClassificationTask()
    return DetectionTask()


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker entry point of every training: teacher, student, detection, classification."""
    run = session.current()
    rank, world = run.world_rank, run.world_size
    mark("loop_entered", run.run_name)
    torch.set_num_threads(max(1, int(cfg["threads"])))
    train_cfg, data_spec = cfg["train"], cfg["data"]
    task = loop_task(cfg.get("task", "detection"))
    generator = seed_everything(int(cfg["seed"]) + rank)
    device = run.device()

    train_set, val_set, class_names, collate = task.datasets(data_spec)
    mark("data_loaded", run.run_name)
    batch_size = int(train_cfg["batch_size"])
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=int(cfg["seed"]))
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=False)

    student, teacher, distiller = task.models(cfg, len(class_names))
    mark("models_loaded", run.run_name)
    if getattr(distiller, "balance", None) is not None:
        distiller.balance.watch(list(student.parameters()))  # the KD strength is measured on the student
    channels_last = use_channels_last(train_cfg.get("channels_last", "auto"), device, student)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = autocast_dtype(train_cfg.get("precision", "auto"), device)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    teacher_output_needed = task.needs_teacher_output(teacher, distiller)
    model = StudentWithKD(student, distiller).to(memory_format=memory_format)
    model = run.prepare_model(model)

    params = trainable_parameters(model)
    base_lr = effective_lr(train_cfg, world)
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=float(train_cfg.get("weight_decay", 1e-4)))
    epochs = int(train_cfg["epochs"])
    steps_per_epoch = max(1, len(loader))
    total_steps = epochs * steps_per_epoch
    warmup = int(round(float(train_cfg.get("warmup_epochs", 1.0)) * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: schedule_factor(s, steps_per_epoch, total_steps, max(1, warmup), train_cfg)
    )
    eval_every = int(train_cfg.get("eval_every", 0))

    step, nonfinite_steps, score, start_epoch, val_images = 0, 0, 0.0, 0, 0
    history: list[dict[str, Any]] = []
    start_losses: list[float] = []  # the first steps' losses: the level a diverging run grows away from
    resume_warning = ""
    resumed = run.get_checkpoint()
    if resumed is not None:
        # Continue a killed or failed run where its last readable checkpoint left it.
        resumed, files, resume_warning = load_resume_files(resumed)
        state = files[TRAIN_STATE_FILE]
        student.load_state_dict(files[STUDENT_FILE]["state_dict"])
        if distiller is not None and state.get("kd_parts"):
            distiller.load_state_dict(state["kd_parts"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, score = int(state["epoch"]), int(state["step"]), float(state[task.metric])
        nonfinite_steps, history = int(state["nonfinite_steps"]), list(state["history"])
        start_losses = [history[-1]["loss_start"]] * START_STEPS if history and "loss_start" in history[-1] else []
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
        for batch in loader:
            images, targets = task.to_device(batch, device, memory_format)
            with autocast(device, amp_dtype):
                teacher_out = None
                if teacher_output_needed:
                    with torch.no_grad():
                        teacher_out = teacher(images)
                terms = model(images, targets, teacher_out, epoch_progress(step, steps_per_epoch))
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
            loss_value = float(loss.detach())  # one host sync for both uses
            sums["loss"] = sums.get("loss", 0.0) + loss_value * images.shape[0]
            if len(start_losses) < START_STEPS:
                start_losses.append(loss_value)
            if step == 1:
                mark("first_step", run.run_name)
        elapsed = time.perf_counter() - start
        mark("epoch_end", run.run_name)
        if seen == 0 and len(loader) > 0:
            raise DivergenceError(f"no finite step in epoch {epoch + 1}: non-finite loss terms {bad}")
        last = epoch + 1 == epochs
        evaluated = last or bool(eval_every and (epoch + 1) % eval_every == 0)
        if evaluated:
            score, val_images = task.score(student, val_set, len(class_names), batch_size, device, rank, world)
        metrics = _reduce_means(sums, seen, world)
        if world > 1:
            metrics.update(_shard_coverage(shard, world))
        metrics.update(
            epoch=epoch + 1,
            epochs=epochs,
            **{task.metric: float(score)},
            val_images=val_images,
            images_per_s=seen * world / max(elapsed, 1e-9),
            lr=optimizer.param_groups[0]["lr"],
            base_lr=base_lr,  # lr after scaling with the global batch (lr_reference_batch)
            precision=str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
            channels_last=int(channels_last),
            **{SCORE_METRIC: float(score) if evaluated else UNSCORED},
            nonfinite_steps=nonfinite_steps,
            **({"loss_start": sum(start_losses) / len(start_losses)} if start_losses else {}),
            epoch_s=elapsed,
            start_epoch=start_epoch,  # > 0 when this process resumed from a checkpoint
            **cfg.get("extra_metrics", {}),
        )
        metrics.update(balance_metrics(distiller))
        if resume_warning and epoch == start_epoch:
            metrics["resume_warning"] = resume_warning
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        if rank == 0 and cfg.get("progress_file"):
            _append_line(Path(cfg["progress_file"]), history[-1])
        state = {
            "epoch": epoch + 1,
            "step": step,
            task.metric: float(score),
            "nonfinite_steps": nonfinite_steps,
            "history": history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler_rng": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "kd_parts": {k: v.detach().cpu() for k, v in distiller.state_dict().items()} if distiller else {},
        }
        _report(run, metrics, student, distiller, state, train_cfg, class_names, data_spec, task)
    if start_epoch >= epochs and history:
        # Resumed a run whose training had already finished: report its last state again
        # so the caller gets the final metrics and checkpoint.
        run.report(history[-1], checkpoint=resumed if rank == 0 else None)


def balance_metrics(distiller: Any) -> dict[str, Any]:
    """The KD loss balance's per-method scales and start ratios, and its warning if any."""
    balance = getattr(distiller, "balance", None)
    if balance is None or int(balance.seen) == 0:
        return {}
    out: dict[str, Any] = {f"kd_scale.{m}": v for m, v in balance.scales().items()}
    out.update({f"kd_start_ratio.{m}": v for m, v in balance.start_ratios().items()})
    if balance.warnings():
        out["kd_warning"] = "; ".join(balance.warnings())
    return out


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
    run: session.Session,
    metrics: dict[str, Any],
    student: nn.Module,
    distiller: Distiller | None,
    state: dict[str, Any],
    train_cfg: dict[str, Any],
    class_names: list[str],
    data_spec: dict[str, Any],
    task: Any,
) -> None:
    """Every rank reports each epoch (Train needs the same number of calls); rank 0 adds a checkpoint.

    A checkpoint holds the student alone (``student.pt``, what export reads), the
    learnable KD parts apart (``kd_parts.pt``) and the training state needed to
    resume (``train_state.pt``: optimizer, scheduler, epoch, RNG, metrics history).
    """
    if run.world_rank != 0:
        run.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_model(
            Path(tmp) / STUDENT_FILE,
            student,
            train_cfg["model"],
            class_names,
            int(data_spec["input_size"]),
            meta={task.metric: metrics[task.metric], "epoch": metrics["epoch"], "epochs": metrics["epochs"]},
            kind=task.kind,
        )
        if distiller is not None:
            atomic_torch_save(state["kd_parts"], Path(tmp) / KD_PARTS_FILE)
        atomic_torch_save(state, Path(tmp) / TRAIN_STATE_FILE)
        run.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to ``dtype`` on ``device``, or nothing for plain fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def load_resume_files(latest: ray.train.Checkpoint) -> tuple[ray.train.Checkpoint, dict[str, Any], str]:
    """The files to resume from: the latest checkpoint's, or, when those are torn or unreadable,
    the newest older checkpoint that reads. Returns the checkpoint used, its files and a warning
    ("" when the latest was fine). Raises when no checkpoint of the run reads."""
    problems: list[str] = []
    for candidate in [latest, *older_checkpoints(latest)]:
        try:
            with candidate.as_directory() as folder:
                files = read_checkpoint_files(Path(folder), [TRAIN_STATE_FILE, STUDENT_FILE])
        except (RkdError, OSError) as err:
            problems.append(str(err))
            continue
        if not problems:
            return candidate, files, ""
        warning = (
            f"latest checkpoint {latest.path} is unreadable ({problems[0]}); resumed from the older "
            f"{candidate.path} (epoch {int(files[TRAIN_STATE_FILE]['epoch'])})"
        )
        log.warning(warning)
        return candidate, files, warning
    raise RkdError("no checkpoint of this run is readable: " + "; ".join(problems))
