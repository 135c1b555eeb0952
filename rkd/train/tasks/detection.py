"""Oriented (and horizontal) object detection: DOTA-style data, a detector zoo, detection KD methods
(:mod:`rkd.distill`), val mAP50 over whole scenes (:mod:`rkd.train.evaluate`).

A checkpoint folder of a detection run holds ``student.pt`` (the detector alone, ``kind: detector``),
``kd_parts.pt`` (the learnable KD parts) and ``train_state.pt`` (see :mod:`rkd.train.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd import storage
from rkd.data.cache_build import fill_patch_cache
from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.data.dataset import class_names as detection_class_names
from rkd.distill.distiller import build_distiller
from rkd.metrics import METRIC_LABELS
from rkd.train.config import LoopConfig
from rkd.train.evaluate import evaluate
from rkd.train.prior import attach_prior_states, prepare_priors, prior_cache_dir
from rkd.train.tasks.base import TaskBase


class DetectionTask(TaskBase):
    name = "detection"
    metric = "map50"
    metric_label = METRIC_LABELS["map50"]
    checkpoint_kind = "detector"
    model_kinds = None
    excluded_kinds = ("classifier",)
    default_model_kind = "retinanet"
    teacher_hash_parts = ()  # detection teacher hashes stay as they were (cached teachers stay valid)
    collate = staticmethod(collate_detection)
    validate_data = staticmethod(validate_data_spec)

    # -- data -------------------------------------------------------------------------------------------
    def class_names(self, data: dict[str, Any]) -> list[str]:
        return detection_class_names(data)

    def dataset(self, data: dict[str, Any], split: str, train: bool) -> Any:
        return build_dataset(data, split, train=train)

    def fill_caches(self, data: dict[str, Any], log: Callable[[str], None] = print) -> None:
        fill_patch_cache(data, log)

    def split_files(self, data: dict[str, Any], split: str) -> tuple[list[Path], list[str]]:
        dataset = build_dataset(data, split, train=False)
        files = [r.image_path for r in dataset.scenes or dataset.records if r.image_path is not None]
        return files, dataset.report.skipped if dataset.report is not None else []  # none for generated data

    # -- training ---------------------------------------------------------------------------------------
    def prepare_priors(
        self,
        methods: dict[str, Any],
        teacher_checkpoint: str,
        data: dict[str, Any],
        cache_dir: Path,
        seed: int,
        log: Callable[[str], None] = print,
        remote: str | None = None,
    ) -> dict[str, str]:
        """The loop config's ``prior_states``: KD methods' prior stages (DS2D2's HF amplifier), trained
        once on the teacher, then reused from ``cache_dir`` or, when an earlier run of any name trained
        them, from rkd's cache (:func:`rkd.train.prior.prior_cache_dir`)."""
        priors = prepare_priors(
            methods, teacher_checkpoint, data, cache_dir, seed, log, remote=remote, kept_dir=prior_cache_dir()
        )
        return {name: result.path for name, result in priors.items()}

    def models(self, cfg: LoopConfig, num_classes: int) -> tuple[nn.Module, nn.Module | None, Any]:
        """``(student, frozen teacher or None, distiller or None)`` of a loop config."""
        settings = cfg.train
        student = self.build_model(settings.model, num_classes)
        teacher, distiller = None, None
        if cfg.teacher_checkpoint:
            teacher, _ = self.load_model(storage.local_copy(cfg.teacher_checkpoint), keep=True)
            if settings.methods:
                distiller = build_distiller(
                    settings.methods, student.info, teacher.info, balance=settings.kd_balance or {}
                )
                attach_prior_states(distiller, cfg.prior_states)
        return student, teacher, distiller

    caches_teacher_outputs = True

    def sample_keys(self, batch: Any) -> list[str] | None:
        return [meta["pixels"] for meta in batch[2]]

    def needs_teacher_output(self, teacher: nn.Module | None, distiller: Any) -> bool:
        return teacher is not None and distiller is not None

    def to_device(self, batch: Any, device: torch.device, memory_format: torch.memory_format) -> tuple[Tensor, Any]:
        images, targets, _ = batch
        # non_blocking: the copy from pinned memory (CUDA) overlaps; a no-op otherwise.
        return images.to(device, memory_format=memory_format, non_blocking=True), targets.to(device)

    def score(
        self,
        model: nn.Module,
        val_set: Any,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        rank: int,
        world: int,
    ) -> tuple[float, int]:
        """``(val mAP50, images scored)``, over the whole val split whatever the ranks."""
        scored = evaluate(model, val_set, num_classes, batch_size)
        return float(scored.map), scored.num_images
