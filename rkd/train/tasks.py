"""What differs between the two tasks rkd trains: oriented detection and scene classification.

A spec's ``task:`` picks one. Everything downstream (stages, the teacher gate, search
trials, the Pareto files) asks the task for its data reader, its KD-method registry,
its training loop and its accuracy metric, instead of branching on the task's name.

>>> TASKS["classification"].metric, TASKS["detection"].metric_label
('top1', 'mAP50')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from rkd.metrics import METRIC_LABELS


def check_declared_sign(param: Any, value: Any, where: str) -> None:
    """Refuse a value on the wrong side of 0 for its declared range: a range declared above 0 (KD weights
    on a log scale, temperatures) admits nothing <= 0, one starting at 0 nothing below it. A negative KD
    weight pushes the student away from the teacher; a temperature of 0 divides by zero."""
    from rkd.errors import SpecError

    if param.kind not in ("float", "int") or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if param.low > 0 and value <= 0:
        raise SpecError(where, f"must be > 0 (declared range {param.low:g} to {param.high:g}), got {value!r}")
    if param.low >= 0 and value < 0:
        raise SpecError(where, f"must be >= 0 (declared range {param.low:g} to {param.high:g}), got {value!r}")


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the key of the accuracy metric the loop reports and the search maximises
    metric_label: str
    checkpoint_kind: str  # the ``kind`` of its checkpoints and exports
    model_kinds: tuple[str, ...] | None  # allowed ``model.kind`` values (None: any but the excluded)
    excluded_kinds: tuple[str, ...]

    # -- validation (spec load time) -------------------------------------------------------------------
    def validate_data(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.name == "classification":
            from rkd.data.scene_dataset import validate_scene_data_spec

            return validate_scene_data_spec(data)
        from rkd.data.dataset import validate_data_spec

        return validate_data_spec(data)

    def validate_methods(self, methods: Any, base: Path | None) -> dict[str, dict[str, Any]]:
        if self.name == "classification":
            from rkd.distill.classifier_kd import validate_classifier_methods

            resolved = validate_classifier_methods(methods)
        else:
            from rkd.distill.distiller import validate_methods

            resolved = validate_methods(methods, base)
        registry = self.method_registry()
        for name, values in resolved.items():
            for key, param in registry[name].params.items():
                if key in values:
                    check_declared_sign(param, values[key], f"{name}.{key}")
        return resolved

    def method_registry(self) -> dict[str, Any]:
        """Name -> component class: what a search space's ``methods:`` refers to."""
        if self.name == "classification":
            from rkd.distill.classifier_kd import CLASSIFIER_KD_METHODS

            return CLASSIFIER_KD_METHODS
        import rkd.distill  # noqa: F401  (registers every detection method)
        from rkd.distill.base import KD_METHODS

        return KD_METHODS

    def check_model_kind(self, kind: str) -> str | None:
        """An error message when a model of ``kind`` cannot do this task, else None."""
        if kind in self.excluded_kinds or (self.model_kinds is not None and kind not in self.model_kinds):
            allowed = self.model_kinds or "a detector kind"
            return f"a {self.name} task needs model.kind {allowed}, got {kind!r} (set the spec's task: to change it)"
        return None

    # -- training and evaluation ---------------------------------------------------------------------
    def class_names(self, data: dict[str, Any]) -> list[str]:
        if self.name == "classification":
            from rkd.data.scene_dataset import build_scene_dataset

            return data.get("classes") or build_scene_dataset(data, "train", train=False).class_names
        from rkd.data.dataset import class_names

        return class_names(data)

    def check_data(self, data: dict[str, Any]) -> tuple[list[Path], list[str]]:
        """Read every label (or class folder) of both splits now: problems surface before Ray starts.
        Returns the image files the two splits read (none for generated data), for a check of their pixels,
        and the label lines ``on_error: skip`` left out (``file:line: why``; detection only)."""
        files: list[Path] = []
        skipped: list[str] = []
        for split in ("train", "val"):
            if self.name == "classification":
                from rkd.data.scene_dataset import build_scene_dataset

                files += [path for path, _ in build_scene_dataset(data, split, train=False).items]
            else:
                from rkd.data.dataset import build_dataset

                dataset = build_dataset(data, split, train=False)
                files += [r.image_path for r in dataset.scenes or dataset.records if r.image_path is not None]
                skipped += dataset.report.skipped if dataset.report is not None else []  # none for generated data
        return files, list(dict.fromkeys(skipped))  # a split read twice (train == val) lists a line once

    def build_model(self, model_spec: dict[str, Any], num_classes: int) -> nn.Module:
        if self.name == "classification":
            from rkd.models import build_classifier

            return build_classifier(model_spec, num_classes)
        from rkd.models import build_detector

        return build_detector(model_spec, num_classes)

    def make_loop_config(self, data: dict[str, Any], train: dict[str, Any], seed: int, threads: int,
                         teacher_checkpoint: str | None = None, extra_metrics: dict[str, Any] | None = None,
                         **kwargs: Any) -> dict[str, Any]:
        from rkd.train.loop import make_loop_config

        return make_loop_config(data, train, seed, threads, teacher_checkpoint=teacher_checkpoint,
                                extra_metrics=extra_metrics, task=self.name, **kwargs)

    @property
    def loop(self) -> Callable[[dict[str, Any]], None]:
        """The Ray Train worker function: one loop for both tasks (the config says which)."""
        from rkd.train.loop import train_loop

        return train_loop

    def load_model(self, path: Path) -> tuple[nn.Module, dict[str, Any]]:
        if self.name == "classification":
            from rkd.train.classify import load_classifier

            return load_classifier(path)
        from rkd.train.checkpoint import load_detector

        return load_detector(path)

    def score_file(self, path: Path, data: dict[str, Any], batch_size: int) -> tuple[float, nn.Module, int]:
        """``(val accuracy, model, num_classes)`` of a checkpoint file, on the data's val split."""
        import torch

        model, ckpt = self.load_model(path)
        names = self.class_names(data)
        if ckpt["num_classes"] != len(names):
            from rkd.errors import RkdError

            raise RkdError(
                f"{path}: the model predicts {ckpt['num_classes']} classes but the data has {len(names)} ({', '.join(names)})"
            )
        if self.name == "classification":
            from rkd.data.scene_dataset import build_scene_dataset
            from rkd.train.classify import top1_accuracy

            val = build_scene_dataset(data, "val", train=False)
            score, _ = top1_accuracy(model, val, batch_size, torch.device("cpu"), 0, 1)
            return score, model, len(names)
        from rkd.data.dataset import build_dataset
        from rkd.train.evaluate import evaluate

        val = build_dataset(data, "val", train=False)
        return float(evaluate(model, val, len(names), batch_size).map), model, len(names)


TASKS = {
    "detection": Task("detection", "map50", METRIC_LABELS["map50"], "detector", None, ("classifier",)),
    "classification": Task("classification", "top1", METRIC_LABELS["top1"], "classifier", ("classifier",), ()),
}
TASK_OF_METRIC = {task.metric: task for task in TASKS.values()}  # a run's accuracy objective -> its task
TASK_OF_KIND = {task.checkpoint_kind: task for task in TASKS.values()}  # a checkpoint's kind -> its task


