"""What differs between the two tasks rkd trains: oriented detection and scene classification.

A spec's ``task:`` picks one. Everything downstream (spec validation, stages, the teacher gate,
search trials, the Pareto files, the training loop) asks the task (:class:`Task`) for its data
reader, its models, its KD-method registry, its batches and its accuracy metric, instead of
branching on the task's name. Each task is one module: :mod:`rkd.train.tasks.detection`,
:mod:`rkd.train.tasks.classification`.

>>> TASKS["classification"].metric, TASKS["detection"].metric_label
('top1', 'mAP50')
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rkd.train.config import LoopConfig
from rkd.train.tasks.classification import ClassificationTask
from rkd.train.tasks.detection import DetectionTask


class Task(Protocol):
    """One task rkd trains. Attributes: ``name``; ``metric`` (the key of the accuracy metric the loop
    reports and the search maximises) and its ``metric_label``; ``checkpoint_kind`` (the ``kind`` of
    its checkpoints and exports); ``model_kinds`` / ``excluded_kinds`` (the ``model.kind`` values it
    takes); ``default_model_kind``; ``teacher_hash_parts`` (what a teacher's content hash adds for the
    task); ``collate`` (its batches' collate function; where ``caches_teacher_outputs``, it takes
    ``keyed=True`` to put each sample's cache key in its meta)."""

    name: str
    metric: str
    metric_label: str
    checkpoint_kind: str
    model_kinds: tuple[str, ...] | None
    excluded_kinds: tuple[str, ...]
    default_model_kind: str
    teacher_hash_parts: tuple[str, ...]
    collate: Callable[[list[Any]], Any]

    # -- the spec (validated at load time) --------------------------------------------------------------
    def validate_data(self, data: dict[str, Any]) -> dict[str, Any]: ...

    def validate_methods(self, methods: Any, base: Path | None) -> dict[str, dict[str, Any]]: ...

    def method_registry(self) -> dict[str, Any]: ...

    def check_model_kind(self, kind: str) -> str | None: ...

    # -- data ---------------------------------------------------------------------------------------------
    def class_names(self, data: dict[str, Any]) -> list[str]: ...

    def check_data(self, data: dict[str, Any]) -> tuple[list[Path], list[str]]: ...

    def fill_caches(self, data: dict[str, Any], log: Callable[[str], None] = print) -> None: ...

    def dataset(self, data: dict[str, Any], split: str, train: bool) -> Any: ...

    def datasets(self, data: dict[str, Any]) -> tuple[Any, Any, list[str]]: ...

    # -- models and checkpoints ---------------------------------------------------------------------------
    def build_model(self, model_spec: dict[str, Any] | None, num_classes: int) -> nn.Module: ...

    def load_model(self, path: Path, keep: bool = False) -> tuple[nn.Module, dict[str, Any]]: ...

    def score_file(self, path: Path, data: dict[str, Any], batch_size: int) -> tuple[float, nn.Module, int]: ...

    # -- training (the loop's side) -----------------------------------------------------------------------
    def make_loop_config(
        self,
        data: dict[str, Any],
        train: dict[str, Any],
        seed: int,
        threads: int,
        teacher_checkpoint: str | None = None,
        extra_metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]: ...

    def prepare_priors(
        self,
        methods: dict[str, Any],
        teacher_checkpoint: str,
        data: dict[str, Any],
        cache_dir: Path,
        seed: int,
        log: Callable[[str], None] = print,
        remote: str | None = None,
    ) -> dict[str, str]: ...

    def models(self, cfg: LoopConfig, num_classes: int) -> tuple[nn.Module, nn.Module | None, Any]: ...

    caches_teacher_outputs: bool

    def sample_keys(self, batch: Any) -> list[str] | None: ...

    def needs_teacher_output(self, teacher: nn.Module | None, distiller: Any) -> bool: ...

    def to_device(self, batch: Any, device: torch.device, memory_format: torch.memory_format) -> tuple[Tensor, Any]: ...

    def score(
        self,
        model: nn.Module,
        val_set: Any,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        rank: int,
        world: int,
    ) -> tuple[float, int]: ...


TASKS: dict[str, Task] = {"detection": DetectionTask(), "classification": ClassificationTask()}
TASK_OF_METRIC = {task.metric: task for task in TASKS.values()}  # a run's accuracy objective -> its task
TASK_OF_KIND = {task.checkpoint_kind: task for task in TASKS.values()}  # a checkpoint's kind -> its task

__all__ = ["TASKS", "TASK_OF_KIND", "TASK_OF_METRIC", "Task"]
