"""Training scene classifiers on Ray Train: the classification side of :mod:`rkd.train.loop`.

:func:`rkd.train.loop.train_loop` runs every training; for ``task: classification`` it asks
:class:`ClassificationTask` for the class-folder datasets, the classifier student, teacher and
KD methods (:mod:`rkd.distill.classifier_kd`), the batches and the val score (top-1 accuracy
over the whole val split, counted over all ranks). DDP, schedules, precision, checkpoints and
resumption are the shared loop's.

A checkpoint folder holds ``student.pt`` (the classifier alone, :func:`save_classifier`: the
detector checkpoint layout with ``kind: classifier``), ``kd_parts.pt`` (the learnable KD parts,
e.g. SSKDNet's branch, never exported) and ``train_state.pt`` (optimizer, scheduler, RNG, history).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from rkd import storage
from rkd.data.scene_dataset import SceneDataset, build_scene_dataset, collate_scenes
from rkd.distill.classifier_kd import ClassifierDistiller, build_classifier_distiller
from rkd.errors import RkdError, SpecError
from rkd.models import Classifier, build_classifier
from rkd.train.checkpoint import load_model, save_model

# ----------------------------------------------------------------------------------------------
# Classifier checkpoints (the sibling of rkd.train.checkpoint.save_detector / load_detector).


def save_classifier(path: Path, model: nn.Module, model_spec: dict[str, Any], class_names: list[str],
                    input_size: int, meta: dict[str, Any] | None = None) -> None:
    """Write a classifier checkpoint (the detector layout with ``kind: classifier``), atomically."""
    save_model(path, model, model_spec, class_names, input_size, meta, kind="classifier")


def load_classifier(path: Path, keep: bool = False) -> tuple[Classifier, dict[str, Any]]:
    """Build the classifier a checkpoint describes and load its weights strictly (``keep``: see
    :func:`rkd.train.checkpoint.load_model`)."""
    return load_model(path, "classifier", keep)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# The worker loop.


def top1_accuracy(
    model: Classifier, dataset: SceneDataset, batch_size: int, device: torch.device, rank: int, world: int
) -> tuple[float, int]:
    """``(top-1 accuracy, images)`` over the whole dataset: each rank scores every ``world``-th
    image (no padding, unlike ``DistributedSampler``) and the counts are summed over ranks."""
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate_scenes)
    counts = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            predicted = model(images.to(device)).logits.argmax(dim=1).cpu()
            counts += torch.tensor([float((predicted == labels).sum()), float(len(labels))], dtype=torch.float64)
    model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(counts)
    return float(counts[0] / max(1.0, float(counts[1]))), int(counts[1])


class ClassificationTask:
    """What :func:`rkd.train.loop.train_loop` needs to know about scene classification."""

    metric = "top1"
    kind = "classifier"

    def datasets(self, data_spec: dict[str, Any]) -> tuple[SceneDataset, SceneDataset, list[str], Any]:
        train_set = build_scene_dataset(data_spec, "train", train=True)
        val_set = build_scene_dataset(data_spec, "val", train=False)
        return train_set, val_set, list(train_set.class_names), collate_scenes

    def models(self, cfg: dict[str, Any], num_classes: int) -> tuple[Classifier, Classifier | None, Any]:
        train_cfg = cfg["train"]
        student = build_classifier(train_cfg["model"], num_classes)
        teacher = None
        if cfg.get("teacher_checkpoint"):
            teacher, ckpt = load_classifier(storage.local_copy(cfg["teacher_checkpoint"]), keep=True)
            if ckpt["num_classes"] != num_classes:
                raise RkdError(
                    f"{cfg['teacher_checkpoint']}: the teacher has {ckpt['num_classes']} classes, the data {num_classes}"
                )
        distiller = None
        if train_cfg.get("methods"):
            try:
                teacher_info = teacher.info if teacher is not None else None
                distiller = build_classifier_distiller(
                    train_cfg["methods"], student.info, teacher_info, balance=train_cfg.get("kd_balance") or {}
                )
            except SpecError as err:
                raise err.within("methods") from None
        return student, teacher, distiller

    def needs_teacher_output(self, teacher: nn.Module | None, distiller: ClassifierDistiller | None) -> bool:
        # Self-distillation alone (sskd) needs no teacher forward.
        return teacher is not None and distiller is not None and distiller.needs_teacher

    def to_device(self, batch: Any, device: torch.device, memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return images.to(device, memory_format=memory_format), labels.to(device)

    def score(self, student: nn.Module, val_set: SceneDataset, num_classes: int, batch_size: int,
              device: torch.device, rank: int, world: int) -> tuple[float, int]:
        return top1_accuracy(student, val_set, batch_size, device, rank, world)


__all__ = [
    "ClassificationTask",
    "load_classifier",
    "save_classifier",
    "top1_accuracy",
]
