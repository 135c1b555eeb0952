"""The training loop every training runs, on each Ray Train worker or in-process: teacher and students alike.

The loop is a plain function of a JSON-able config (see :func:`rkd.train.config.make_loop_config`)
so it runs unchanged on one process, on N DDP workers of one machine, or across
nodes. The frozen teacher is replicated on every worker and never wrapped in
DDP: it has no trainable parameters, so nothing of it is synchronised. What differs
between detection and classification (data, models, batches, the val score) it asks
the config's task (:mod:`rkd.train.tasks`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from rkd.data.loading import EpochIndices, SeededSamples, loader_options, resolve_workers
from rkd.distill.distiller import Distiller, nonfinite_terms
from rkd.outputs import Targets
from rkd.timeline import mark
from rkd.train import session
from rkd.train.checkpoint import (
    SCORE_METRIC,
    STUDENT_FILE,
    TRAIN_STATE_FILE,
    UNSCORED,
    load_resume_files,
    write_run_checkpoint,
)
from rkd.train.config import LoopConfig, TrainConfig
from rkd.train.tasks import TASKS, Task
from rkd.train.teacher_outputs import TeacherOutputCache, build_cache, keeps_outputs

MAX_NONFINITE_STEPS = 5

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


def schedule_factor(
    step: int, steps_per_epoch: int, total: int, warmup: int, schedule: str, step_epochs: list[int], step_gamma: float
) -> float:
    """The lr multiplier at ``step``: linear warm-up, then cosine decay (:func:`lr_factor`) or,
    with ``schedule: step``, ``step_gamma`` to the power of the ``step_epochs`` passed.

    >>> [round(schedule_factor(s, 10, 40, 5, "step", [2, 3], 0.1), 4) for s in (0, 9, 19, 20, 29, 30)]
    [0.2, 1.0, 1.0, 0.1, 0.1, 0.01]
    """
    if schedule != "step":
        return lr_factor(step, total, warmup)
    if step < warmup:
        return (step + 1) / warmup
    epochs_done = step // max(1, steps_per_epoch)
    passed = sum(1 for e in step_epochs if epochs_done >= int(e))
    return float(step_gamma) ** passed


def effective_lr(lr: float, batch_size: int, reference: int | None, world: int) -> float:
    """``lr`` scaled linearly with the global batch when a reference batch (``lr_reference_batch``) is set.

    >>> effective_lr(0.01, 8, 16, 4)
    0.02
    >>> effective_lr(0.01, 8, None, 4)  # no reference: lr as given
    0.01
    """
    lr = float(lr)
    return lr if not reference else lr * int(batch_size) * world / int(reference)


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


@dataclass
class Training:
    """What one loop trains with, built once (:func:`build_training`) before the first epoch."""

    run: session.Session
    cfg: LoopConfig
    task: Task
    device: torch.device
    generator: torch.Generator  # the sampler's RNG (saved in checkpoints)
    sampler: Sampler[int]
    loader: DataLoader
    val_set: Any
    class_names: list[str]
    student: nn.Module
    teacher: nn.Module | None
    distiller: Any
    model: nn.Module  # the student with the KD parts (StudentWithKD), DDP-wrapped with several workers
    teacher_output_needed: bool
    channels_last: bool
    amp_dtype: torch.dtype | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    base_lr: float
    steps_per_epoch: int
    teacher_cache: TeacherOutputCache | None = None  # teacher outputs kept per input (teacher.cache)

    @property
    def settings(self) -> TrainConfig:
        return self.cfg.train

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves and a resumed run starts from."""

    start_epoch: int = 0  # > 0 when this process resumed from a checkpoint
    step: int = 0
    score: float = 0.0  # the last val accuracy (carried over epochs without evaluation)
    val_images: int = 0
    nonfinite_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # the first steps' losses: the level a diverging run grows away from
    start_losses: list[float] = field(default_factory=list)
    resumed: ray.train.Checkpoint | None = None  # the checkpoint resumed from
    resume_warning: str = ""


@dataclass
class EpochSums:
    """The loss terms summed over one epoch's images on this rank."""

    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    bad: list[str] = field(default_factory=list)  # the non-finite terms of the last skipped step

    def add(self, terms: dict[str, Tensor], loss_value: float, images: int) -> None:
        self.seen += images
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach()) * images
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss_value * images


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point of every training: teacher, student, detection, classification."""
    run = session.current()
    mark("loop_entered", run.run_name)
    cfg = LoopConfig.from_dict(config)
    torch.set_num_threads(max(1, cfg.threads))
    t = build_training(run, cfg)
    progress = resume(t)
    epochs = int(t.settings.epochs)
    for epoch in range(progress.start_epoch, epochs):
        sums, elapsed, shard = train_epoch(t, progress, epoch)
        evaluated = evaluate_epoch(t, progress, epoch)
        metrics = epoch_metrics(t, progress, epoch, sums, elapsed, shard, evaluated)
        record_epoch(t, progress, metrics)
        report_epoch(t, metrics, train_state(t, progress, epoch))
    if progress.start_epoch >= epochs and progress.history:
        # Resumed a run whose training had already finished: report its last state again
        # so the caller gets the final metrics and checkpoint.
        run.report(progress.history[-1], checkpoint=progress.resumed if run.world_rank == 0 else None)


# -- before the first epoch ------------------------------------------------------------------------------


def build_training(run: session.Session, cfg: LoopConfig) -> Training:
    """Seed, then build the data loader, the models and the optimiser (in this order: the seed fixes
    the data order and the initial weights)."""
    task = TASKS[cfg.task]
    generator = seed_everything(cfg.seed + run.world_rank)
    device = run.device()
    workers = resolve_workers(cfg.data, cfg.threads, device)
    # the datasets share their memory budget over the loader's worker processes
    train_set, val_set, class_names = task.datasets({**cfg.data, "workers": workers})
    mark("data_loaded", run.run_name)
    keyed = keeps_outputs(cfg, task.caches_teacher_outputs)  # the loader then keys each sample's pixels
    sampler, loader = build_loader(train_set, task, cfg, run, generator, workers, device, keyed)
    student, teacher, distiller = task.models(cfg, len(class_names))
    mark("models_loaded", run.run_name)
    model, channels_last, amp_dtype = place_models(run, cfg.train, device, student, teacher, distiller)
    params = trainable_parameters(model)
    steps_per_epoch = max(1, len(loader))
    optimizer, scheduler, base_lr = build_optimizer(params, cfg.train, run.world_size, steps_per_epoch)
    return Training(
        run=run,
        cfg=cfg,
        task=task,
        device=device,
        generator=generator,
        sampler=sampler,
        loader=loader,
        val_set=val_set,
        class_names=class_names,
        student=student,
        teacher=teacher,
        distiller=distiller,
        model=model,
        teacher_output_needed=task.needs_teacher_output(teacher, distiller),
        channels_last=channels_last,
        amp_dtype=amp_dtype,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        base_lr=base_lr,
        steps_per_epoch=steps_per_epoch,
        teacher_cache=build_cache(cfg, task.caches_teacher_outputs) if keyed else None,
    )


def build_loader(
    train_set: Any,
    task: Task,
    cfg: LoopConfig,
    run: session.Session,
    generator: torch.Generator,
    workers: int,
    device: torch.device,
    keyed: bool = False,
) -> tuple[Sampler[int], DataLoader]:
    """The training batches of this rank: its shard of a shuffled epoch with several workers;
    ``keyed``: each sample's meta holds its teacher-output cache key (the task's ``collate`` takes
    ``keyed=True``)."""
    world, rank = run.world_size, run.world_rank
    sampler: Sampler[int]
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    # Worker processes draw each sample's augmentations from its own seed (rkd.data.loading).
    indices = EpochIndices(sampler) if workers > 0 else sampler
    loaded = SeededSamples(train_set, cfg.seed + rank) if workers > 0 else train_set
    loader = DataLoader(
        loaded,
        batch_size=int(cfg.train.batch_size),
        sampler=indices,
        collate_fn=partial(task.collate, keyed=True) if keyed else task.collate,
        drop_last=False,
        **loader_options(workers, device),
    )
    return sampler, loader


def place_models(
    run: session.Session,
    settings: TrainConfig,
    device: torch.device,
    student: nn.Module,
    teacher: nn.Module | None,
    distiller: Any,
) -> tuple[nn.Module, bool, torch.dtype | None]:
    """The student and its KD parts as one trained module, on ``device`` (DDP with several workers);
    the teacher frozen on ``device``. Returns the module, whether it is channels-last and the autocast dtype."""
    if getattr(distiller, "balance", None) is not None:
        distiller.balance.watch(list(student.parameters()))  # the KD strength is measured on the student
    channels_last = use_channels_last(settings.channels_last, device, student)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = autocast_dtype(settings.precision, device)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    model = StudentWithKD(student, distiller).to(memory_format=memory_format)
    return run.prepare_model(model), channels_last, amp_dtype


def build_optimizer(
    params: list[nn.Parameter], settings: TrainConfig, world: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, float]:
    """AdamW over ``params`` and its per-step lr schedule; returns them and the base lr."""
    base_lr = effective_lr(settings.lr, settings.batch_size, settings.lr_reference_batch, world)
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=float(settings.weight_decay))
    total_steps = int(settings.epochs) * steps_per_epoch
    warmup = max(1, int(round(float(settings.warmup_epochs) * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: schedule_factor(
            s, steps_per_epoch, total_steps, warmup, settings.schedule, settings.step_epochs, settings.step_gamma
        ),
    )
    return optimizer, scheduler, base_lr


def resume(t: Training) -> Progress:
    """Continue a killed or failed run where its last readable checkpoint left it (a fresh start without one)."""
    latest = t.run.get_checkpoint()
    if latest is None:
        return Progress()
    resumed, files, warning = load_resume_files(latest)
    state = files[TRAIN_STATE_FILE]
    t.student.load_state_dict(files[STUDENT_FILE]["state_dict"])
    if t.distiller is not None and state.get("kd_parts"):
        t.distiller.load_state_dict(state["kd_parts"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    history = list(state["history"])
    progress = Progress(
        start_epoch=int(state["epoch"]),
        step=int(state["step"]),
        score=float(state[t.task.metric]),
        nonfinite_steps=int(state["nonfinite_steps"]),
        history=history,
        resumed=resumed,
        resume_warning=warning,
        start_losses=[history[-1]["loss_start"]] * START_STEPS if history and "loss_start" in history[-1] else [],
    )
    t.generator.set_state(state["sampler_rng"])
    torch.set_rng_state(state["torch_rng"])
    return progress


# -- one epoch -------------------------------------------------------------------------------------------


def train_epoch(t: Training, progress: Progress, epoch: int) -> tuple[EpochSums, float, list[int]]:
    """One pass over this rank's shard. Returns the summed loss terms, the seconds it took and the
    shard's image indices (with several workers)."""
    shard: list[int] = []
    if isinstance(t.sampler, DistributedSampler):
        t.sampler.set_epoch(epoch)
        shard = list(t.sampler)  # deterministic for a given epoch: the order the loader will use
    if isinstance(t.loader.sampler, EpochIndices):
        t.loader.sampler.epoch = epoch
    t.model.train()
    sums = EpochSums()
    start = time.perf_counter()
    for batch in t.loader:
        train_step(t, progress, sums, batch)
    elapsed = time.perf_counter() - start
    mark("epoch_end", t.run.run_name)
    if sums.seen == 0 and len(t.loader) > 0:
        raise DivergenceError(f"no finite step in epoch {epoch + 1}: non-finite loss terms {sums.bad}")
    return sums, elapsed, shard


def train_step(t: Training, progress: Progress, sums: EpochSums, batch: Any) -> None:
    """One optimiser step on ``batch``; a step whose loss terms are not all finite is skipped (and a run
    that keeps producing NaN/inf stopped)."""
    images, targets = t.task.to_device(batch, t.device, t.memory_format)
    with autocast(t.device, t.amp_dtype):
        teacher_out = None
        if t.teacher_output_needed:
            with torch.no_grad():
                if t.teacher_cache is not None:
                    teacher_out = t.teacher_cache.outputs(t.teacher, images, t.task.sample_keys(batch))  # type: ignore[arg-type]
                else:
                    teacher_out = t.teacher(images)  # type: ignore[misc]
        terms = t.model(images, targets, teacher_out, epoch_progress(progress.step, t.steps_per_epoch))
    bad = nonfinite_terms(terms)
    if bad:
        sums.bad = bad
        progress.nonfinite_steps += 1
        if progress.nonfinite_steps > MAX_NONFINITE_STEPS:
            raise DivergenceError(f"non-finite loss terms {bad} in {progress.nonfinite_steps} steps")
        t.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        t.scheduler.step()
        return
    loss = sum(terms.values())
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_clip = float(t.settings.grad_clip)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.params, grad_clip)
    t.optimizer.step()
    t.scheduler.step()
    progress.step += 1
    loss_value = float(loss.detach())  # one host sync for both uses
    sums.add(terms, loss_value, images.shape[0])
    if len(progress.start_losses) < START_STEPS:
        progress.start_losses.append(loss_value)
    if progress.step == 1:
        mark("first_step", t.run.run_name)


def evaluate_epoch(t: Training, progress: Progress, epoch: int) -> bool:
    """Score the student on the val split after the last epoch and every ``eval_every``; whether it was."""
    eval_every = int(t.settings.eval_every)
    evaluated = epoch + 1 == int(t.settings.epochs) or bool(eval_every and (epoch + 1) % eval_every == 0)
    if evaluated:
        progress.score, progress.val_images = t.task.score(
            t.student,
            t.val_set,
            len(t.class_names),
            int(t.settings.batch_size),
            t.device,
            t.run.world_rank,
            t.run.world_size,
        )
    return evaluated


def epoch_metrics(
    t: Training, progress: Progress, epoch: int, sums: EpochSums, elapsed: float, shard: list[int], evaluated: bool
) -> dict[str, Any]:
    """What the epoch reports: mean loss terms over all ranks, the val score, speed, lr, settings."""
    world = t.run.world_size
    metrics: dict[str, Any] = _reduce_means(sums.sums, sums.seen, world)
    if world > 1:
        metrics.update(_shard_coverage(shard, world))
    score = float(progress.score)
    metrics.update(
        epoch=epoch + 1,
        epochs=int(t.settings.epochs),
        **{t.task.metric: score},
        val_images=progress.val_images,
        images_per_s=sums.seen * world / max(elapsed, 1e-9),
        lr=t.optimizer.param_groups[0]["lr"],
        base_lr=t.base_lr,  # lr after scaling with the global batch (lr_reference_batch)
        precision=str(t.amp_dtype).replace("torch.", "") if t.amp_dtype else "float32",
        channels_last=int(t.channels_last),
        **{SCORE_METRIC: score if evaluated else UNSCORED},
        nonfinite_steps=progress.nonfinite_steps,
        **({"loss_start": sum(progress.start_losses) / len(progress.start_losses)} if progress.start_losses else {}),
        epoch_s=elapsed,
        start_epoch=progress.start_epoch,  # > 0 when this process resumed from a checkpoint
        **t.cfg.extra_metrics,
    )
    metrics.update(balance_metrics(t.distiller))
    if t.teacher_cache is not None:  # batches whose teacher outputs came from the cache, so far
        metrics.update(teacher_cache_hits=t.teacher_cache.hits, teacher_cache_misses=t.teacher_cache.misses)
    if progress.resume_warning and epoch == progress.start_epoch:
        metrics["resume_warning"] = progress.resume_warning
    return metrics


def record_epoch(t: Training, progress: Progress, metrics: dict[str, Any]) -> None:
    """Add the epoch's plain metrics to the history; rank 0 appends them to the progress file."""
    progress.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    if t.run.world_rank == 0 and t.cfg.progress_file:
        _append_line(Path(t.cfg.progress_file), progress.history[-1])


def train_state(t: Training, progress: Progress, epoch: int) -> dict[str, Any]:
    """What resuming after ``epoch`` needs (``train_state.pt``)."""
    return {
        "epoch": epoch + 1,
        "step": progress.step,
        t.task.metric: float(progress.score),
        "nonfinite_steps": progress.nonfinite_steps,
        "history": progress.history,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "sampler_rng": t.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "kd_parts": {k: v.detach().cpu() for k, v in t.distiller.state_dict().items()} if t.distiller else {},
    }


def report_epoch(t: Training, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Every rank reports each epoch (Train needs the same number of calls); rank 0 adds a checkpoint
    (:func:`rkd.train.checkpoint.write_run_checkpoint`)."""
    if t.run.world_rank != 0:
        t.run.report(metrics)
        return
    metric = t.task.metric
    with tempfile.TemporaryDirectory() as tmp:
        write_run_checkpoint(
            Path(tmp),
            t.student,
            t.settings.model,
            t.class_names,
            int(t.cfg.data["input_size"]),
            meta={metric: metrics[metric], "epoch": metrics["epoch"], "epochs": metrics["epochs"]},
            kind=t.task.checkpoint_kind,
            state=state,
            with_kd_parts=t.distiller is not None,
        )
        t.run.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# -- helpers ---------------------------------------------------------------------------------------------


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to ``dtype`` on ``device``, or nothing for plain fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
