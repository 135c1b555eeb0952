"""Validation mAP over the whole val split, also when the work is sharded over DDP ranks.

Each rank predicts the images ``rank, rank + world, ...``; the detections are
gathered so every rank scores all val images (not just its own shard) and all
ranks report the same number. On a tiled dataset the patches' detections are
merged back into their scenes and mAP is measured on the whole scenes. A horizontal-box
detector is scored as DOTA's HBB task scores it: against the horizontal boxes enclosing the
oriented ground truth (:func:`scored`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from rkd.data.dataset import collate_detection
from rkd.eval import MapResult, evaluate_detections
from rkd.eval.merge import merge_patches
from rkd.geometry import hbb_to_obb, obb_to_hbb


def scored(det: dict[str, Any], gt_boxes: Tensor) -> tuple[dict[str, Any], Tensor]:
    """Detections and ground-truth boxes of an image as validation scores them: le90 on both sides.

    A horizontal-box detector's ``(M, 4)`` xyxy boxes become axis-aligned le90 boxes and the le90
    ground truth the horizontal boxes enclosing it, so the rotated IoU the evaluator (and the tile
    merge's rotated NMS) computes is the horizontal IoU. Oriented detections are returned as given.
    """
    if det["boxes"].shape[-1] != 4:
        return det, gt_boxes
    return {**det, "boxes": hbb_to_obb(det["boxes"]).to(det["boxes"].dtype)}, enclosing(gt_boxes)


def enclosing(boxes: Tensor) -> Tensor:
    """le90 boxes -> the le90 form of their enclosing horizontal boxes."""
    return hbb_to_obb(obb_to_hbb(boxes)).to(boxes.dtype)


@torch.no_grad()
def predict_shard(model: nn.Module, dataset: Dataset, rank: int, world: int, batch_size: int) -> list[tuple[int, Any]]:
    """``[(dataset index, detections dict, ground-truth dict), ...]`` for this rank's shard."""
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    was_training = model.training
    model.eval()
    in_file_pixels = getattr(dataset, "windows", None) is not None  # patches are merged in scene pixels
    out: list[tuple[int, Any]] = []
    pos = 0
    device = next(model.parameters()).device
    for images, targets, metas in loader:
        detections = model.predict(images.to(device))
        for det, boxes, labels, meta in zip(detections, targets.boxes, targets.labels, metas):
            det, boxes = scored({k: v.cpu() for k, v in det.items()}, boxes)
            gt = {"boxes": boxes, "labels": labels, "difficult": meta.get("difficult")}
            if in_file_pixels:
                det["boxes"] = det["boxes"].clone()
                det["boxes"][:, :4] /= meta["scale"]  # letterboxing scales about the top-left corner
            out.append((indices[pos], (det, gt)))
            pos += 1
    model.train(was_training)
    return out


@dataclass
class Validation:
    """The mAP of a validation pass and how many images it scored (all of them, whatever the ranks)."""

    result: MapResult
    num_images: int

    @property
    def map(self) -> float:
        return self.result.map


def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 8) -> Validation:
    """mAP50 of ``model`` on ``dataset``, gathering shards when a process group is up."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # DDP wraps the model; prediction needs the plain module.
    plain = model.module if hasattr(model, "module") else model
    shard = predict_shard(plain, dataset, rank, world, batch_size)
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, shard)
        shard = [item for part in gathered for item in part]
    shard.sort(key=lambda item: item[0])
    detections = [pair[0] for _, pair in shard]
    truths = [pair[1] for _, pair in shard]
    if getattr(dataset, "windows", None) is not None:
        horizontal = plain.info.box_dim == 4 if hasattr(plain, "info") else False
        detections, truths = merge_into_scenes(dataset, detections, horizontal)
    return Validation(
        evaluate_detections(detections, truths, num_classes=num_classes, iou_threshold=0.5), len(detections)
    )


def merge_into_scenes(
    dataset: Any, patch_detections: list[dict[str, Any]], horizontal: bool = False
) -> tuple[list[Any], list[Any]]:
    """Per-scene detections (patches merged with rotated NMS) and the scenes' own ground truth
    (enclosed by horizontal boxes for a ``horizontal`` detector, see :func:`scored`)."""
    per_scene: list[list[Any]] = [[] for _ in dataset.scenes]
    for (scene, window), det in zip(dataset.windows, patch_detections):
        per_scene[scene].append((window, det))
    detections = [merge_patches(patches) for patches in per_scene]
    truths = [
        {"boxes": enclosing(r.boxes) if horizontal else r.boxes, "labels": r.labels, "difficult": r.difficult}
        for r in dataset.scenes
    ]
    return detections, truths
