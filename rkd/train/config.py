"""What a training is told: how one model is trained (:class:`TrainConfig`, every default of a
training setting written here once) and the config the training loop takes (:class:`LoopConfig`).

The loop's config travels as plain data (:func:`make_loop_config`), so Ray can ship it to its
workers; each worker reads it back typed with :meth:`LoopConfig.from_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# teacher.cache and teacher.cache_gb of a spec that does not set them (rkd.train.teacher_outputs)
TEACHER_CACHE_DEFAULTS: dict[str, Any] = {"mode": "auto", "limit_gb": 20.0}


@dataclass
class TrainConfig:
    """How one model is trained (teacher, or a student with KD methods)."""

    model: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    eval_every: int = 0  # 0: evaluate after the last epoch only
    grad_clip: float = 10.0
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How the KD methods' losses are scaled against the task loss (rkd.distill.balance).
    # None for a teacher (no KD), and then absent from to_dict(), so teacher hashes stay as they were.
    kd_balance: dict[str, Any] | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    schedule: str = "cosine"  # after the warm-up: cosine decay, or steps at step_epochs
    step_epochs: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    lr_reference_batch: int | None = None  # lr is for this many images per step; None: no scaling
    channels_last: str | bool = "auto"  # auto: on for CUDA only
    keep: int = 0  # 0: the last two checkpoints; k: the k best by val mAP50 (and always the latest)
    logging: dict[str, bool] = field(default_factory=dict)  # {tensorboard: true, mlflow: true}

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.__dict__)
        if out["kd_balance"] is None:
            del out["kd_balance"]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The settings of a ``to_dict()`` (or a hand-written subset of one: the rest take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def train_default(name: str) -> Any:
    """The default of the :class:`TrainConfig` setting ``name`` (what a spec without it trains with).

    >>> train_default("grad_clip"), train_default("step_epochs")
    (10.0, [])
    """
    setting = TrainConfig.__dataclass_fields__[name]
    if setting.default_factory is not dataclasses.MISSING:
        return setting.default_factory()
    return setting.default


@dataclass
class LoopConfig:
    """The config of one training loop, as a worker reads it (see :func:`make_loop_config`)."""

    task: str
    data: dict[str, Any]
    train: TrainConfig
    seed: int
    threads: int
    teacher_checkpoint: str | None = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    progress_file: str | None = None
    prior_states: dict[str, str] = field(default_factory=dict)
    teacher_cache: dict[str, Any] = field(default_factory=lambda: {"mode": "off"})

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LoopConfig:
        return cls(
            task=cfg.get("task", "detection"),
            data=cfg["data"],
            train=TrainConfig.from_dict(cfg["train"]),
            seed=int(cfg["seed"]),
            threads=int(cfg["threads"]),
            teacher_checkpoint=cfg.get("teacher_checkpoint"),
            extra_metrics=cfg.get("extra_metrics") or {},
            progress_file=cfg.get("progress_file"),
            prior_states=dict(cfg.get("prior_states") or {}),
            teacher_cache=dict(cfg.get("teacher_cache") or {"mode": "off"}),
        )


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
    teacher_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config :func:`rkd.train.loop.train_loop` takes (plain data only, so Ray can ship it).

    ``task``: ``detection`` (``data`` a detection data section, ``train.model`` a detector) or
    ``classification`` (a scenes data section, a ``kind: classifier`` model, classification KD
    methods); see :mod:`rkd.train.tasks`. ``train``: a :meth:`TrainConfig.to_dict`.

    ``progress_file``: rank 0 appends one JSON line of metrics per epoch to it, for
    the driver to show (workers' stdout is not forwarded: Ray's own logs drown it).
    ``prior_states``: per KD method with a prior stage, the cached file of its trained
    prior modules (:func:`rkd.train.prior.prepare_priors`); they are loaded and frozen.
    ``teacher_cache``: ``{mode: auto|off, limit_gb}`` (:mod:`rkd.train.teacher_outputs`; absent: off).
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
        "teacher_cache": dict(teacher_cache or {"mode": "off"}),
    }


def config_hash(*parts: Any) -> str:
    """A short content hash of JSON-able parts (stage caching, run identity)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
