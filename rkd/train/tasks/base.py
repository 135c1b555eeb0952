"""What both tasks share: the checks of a spec's KD methods and model kind, the loop config, reading
and scoring a checkpoint file. Each task (:mod:`rkd.train.tasks.detection`,
:mod:`rkd.train.tasks.classification`) subclasses :class:`TaskBase` with its own data, models,
KD methods, batches and val score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd.distill import methods_of, validate_methods
from rkd.errors import RkdError
from rkd.models import build_model
from rkd.train.checkpoint import load_model
from rkd.train.config import make_loop_config


class TaskBase:
    """The parts of :class:`rkd.train.tasks.Task` both tasks implement alike."""

    name: str
    metric: str  # the key of the accuracy metric the loop reports and the search maximises
    metric_label: str
    checkpoint_kind: str  # the ``kind`` of its checkpoints and exports
    model_kinds: tuple[str, ...] | None  # allowed ``model.kind`` values (None: any but the excluded)
    excluded_kinds: tuple[str, ...]
    default_model_kind: str  # the ``kind`` of a model spec that names none
    teacher_hash_parts: tuple[str, ...]  # what a teacher's content hash adds for this task
    caches_teacher_outputs = False  # whether rkd.train.teacher_outputs can keep its teacher's outputs

    def sample_keys(self, batch: Any) -> list[str] | None:
        """The teacher-output cache's key of each sample of a training batch (None: not cacheable)."""
        return None

    def method_registry(self) -> dict[str, Any]:
        """Name -> component class: what a search space's ``methods:`` refers to."""
        return methods_of(self.name)

    def validate_methods(self, methods: Any, base: Path | None) -> dict[str, dict[str, Any]]:
        return validate_methods(methods, base, task=self.name)

    def check_model_kind(self, kind: str) -> str | None:
        """An error message when a model of ``kind`` cannot do this task, else None."""
        if kind in self.excluded_kinds or (self.model_kinds is not None and kind not in self.model_kinds):
            allowed = self.model_kinds or "a detector kind"
            return f"a {self.name} task needs model.kind {allowed}, got {kind!r} (set the spec's task: to change it)"
        return None

    def build_model(self, model_spec: dict[str, Any] | None, num_classes: int) -> nn.Module:
        """The model of ``model_spec`` (:func:`rkd.models.build_model`; of this task's default kind
        when the spec names none)."""
        return build_model({"kind": self.default_model_kind, **(model_spec or {})}, num_classes)

    def load_model(self, path: Path, keep: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        """The model of a checkpoint of this task, with its weights (strictly), and the checkpoint
        (``keep``: see :func:`rkd.train.checkpoint.load_model`)."""
        return load_model(path, self.checkpoint_kind, keep, build=self.build_model)

    def make_loop_config(
        self,
        data: dict[str, Any],
        train: dict[str, Any],
        seed: int,
        threads: int,
        teacher_checkpoint: str | None = None,
        extra_metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return make_loop_config(
            data,
            train,
            seed,
            threads,
            teacher_checkpoint=teacher_checkpoint,
            extra_metrics=extra_metrics,
            task=self.name,
            **kwargs,
        )

    def check_data(self, data: dict[str, Any]) -> tuple[list[Path], list[str]]:
        """Read every label (or class folder) of both splits now: problems surface before Ray starts.
        Returns the image files the two splits read (none for generated data), for a check of their pixels,
        and the label lines ``on_error: skip`` left out (``file:line: why``; detection only)."""
        files: list[Path] = []
        skipped: list[str] = []
        for split in ("train", "val"):
            split_files, split_skipped = self.split_files(data, split)
            files += split_files
            skipped += split_skipped
        return files, list(dict.fromkeys(skipped))  # a split read twice (train == val) lists a line once

    def fill_caches(self, data: dict[str, Any], log: Callable[[str], None] = print) -> None:
        """Fill the data's caches of decoded pixels before training, when trials run on this machine
        (the patch cache of tiled scenes: :func:`rkd.data.cache_build.fill_patch_cache`); nothing by default."""

    def split_files(self, data: dict[str, Any], split: str) -> tuple[list[Path], list[str]]:
        """The image files of one split and the label lines it skipped (see :meth:`check_data`)."""
        raise NotImplementedError

    def dataset(self, data: dict[str, Any], split: str, train: bool) -> Any:
        raise NotImplementedError

    def datasets(self, data: dict[str, Any]) -> tuple[Any, Any, list[str]]:
        """``(train set, val set, class names)`` as the training loop reads them."""
        train_set = self.dataset(data, "train", train=True)
        val_set = self.dataset(data, "val", train=False)
        return train_set, val_set, list(train_set.class_names)

    def class_names(self, data: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def score(self, *args: Any, **kwargs: Any) -> tuple[float, int]:
        """``(val accuracy, images scored)``: each task's own (arguments: :meth:`rkd.train.tasks.Task.score`)."""
        raise NotImplementedError

    def score_file(self, path: Path, data: dict[str, Any], batch_size: int) -> tuple[float, nn.Module, int]:
        """``(val accuracy, model, num_classes)`` of a checkpoint file, on the data's val split."""
        model, ckpt = self.load_model(path)
        names = self.class_names(data)
        if ckpt["num_classes"] != len(names):
            raise RkdError(
                f"{path}: the model predicts {ckpt['num_classes']} classes but the data has {len(names)} ({', '.join(names)})"
            )
        val = self.dataset(data, "val", train=False)
        score, _ = self.score(model, val, len(names), batch_size, torch.device("cpu"), 0, 1)
        return score, model, len(names)
