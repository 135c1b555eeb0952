"""Scene classification: class folders of scenes (:mod:`rkd.data.scene_dataset`), a ``kind: classifier``
model, classification KD methods (:mod:`rkd.distill.classification`), val top-1 accuracy over the
whole val split (counted over all ranks).

A checkpoint folder of a classification run holds ``student.pt`` (the classifier alone,
:func:`rkd.train.checkpoint.save_classifier`: the detector layout with ``kind: classifier``), ``kd_parts.pt``
(the learnable KD parts, e.g. SSKDNet's branch, never exported) and ``train_state.pt`` (optimizer,
scheduler, RNG, history); see :mod:`rkd.train.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from rkd import storage
from rkd.data.scene_dataset import SceneDataset, build_scene_dataset, collate_scenes, validate_scene_data_spec
from rkd.distill import Distiller, build_distiller
from rkd.errors import RkdError, SpecError
from rkd.metrics import METRIC_LABELS
from rkd.models import Classifier
from rkd.train.config import LoopConfig
from rkd.train.tasks.base import TaskBase


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


class ClassificationTask(TaskBase):
    name = "classification"
    metric = "top1"
    metric_label = METRIC_LABELS["top1"]
    checkpoint_kind = "classifier"
    model_kinds = ("classifier",)
    excluded_kinds = ()
    default_model_kind = "classifier"
    teacher_hash_parts = ("classification",)
    collate = staticmethod(collate_scenes)
    validate_data = staticmethod(validate_scene_data_spec)

    # -- data -------------------------------------------------------------------------------------------
    def class_names(self, data: dict[str, Any]) -> list[str]:
        return data.get("classes") or build_scene_dataset(data, "train", train=False).class_names

    def dataset(self, data: dict[str, Any], split: str, train: bool) -> SceneDataset:
        return build_scene_dataset(data, split, train=train)

    def split_files(self, data: dict[str, Any], split: str) -> tuple[list[Path], list[str]]:
        return [path for path, _ in build_scene_dataset(data, split, train=False).items], []

    # -- training ---------------------------------------------------------------------------------------
    def prepare_priors(
        self,
        methods: dict[str, Any],
        teacher_checkpoint: str,
        data: dict[str, Any],
        cache_dir: Path,
        seed: int,
        log: Any = print,
        remote: str | None = None,
    ) -> dict[str, str]:
        """No classification KD method has a prior stage: nothing to prepare."""
        return {}

    def models(self, cfg: LoopConfig, num_classes: int) -> tuple[Classifier, Classifier | None, Any]:
        """``(student, frozen teacher or None, distiller or None)`` of a loop config."""
        settings = cfg.train
        student = self.build_model(settings.model, num_classes)
        teacher = None
        if cfg.teacher_checkpoint:
            teacher, ckpt = self.load_model(storage.local_copy(cfg.teacher_checkpoint), keep=True)
            if ckpt["num_classes"] != num_classes:
                raise RkdError(
                    f"{cfg.teacher_checkpoint}: the teacher has {ckpt['num_classes']} classes, the data {num_classes}"
                )
        distiller = None
        if settings.methods:
            try:
                teacher_info = teacher.info if teacher is not None else None
                distiller = build_distiller(
                    settings.methods, student.info, teacher_info, balance=settings.kd_balance or {}
                )
            except SpecError as err:
                raise err.within("methods") from None
        return student, teacher, distiller  # type: ignore[return-value]

    def needs_teacher_output(self, teacher: nn.Module | None, distiller: Distiller | None) -> bool:
        # Self-distillation alone (sskd) needs no teacher forward.
        return teacher is not None and distiller is not None and distiller.needs_teacher

    def to_device(self, batch: Any, device: torch.device, memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return images.to(device, memory_format=memory_format, non_blocking=True), labels.to(device)

    def score(
        self,
        model: nn.Module,
        val_set: SceneDataset,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        rank: int,
        world: int,
    ) -> tuple[float, int]:
        """``(val top-1 accuracy, images scored)``, over the whole val split whatever the ranks."""
        return top1_accuracy(model, val_set, batch_size, device, rank, world)


__all__ = ["ClassificationTask", "top1_accuracy"]
