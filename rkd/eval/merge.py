"""Detections on patches back to whole scenes, so mAP is measured on the scenes.

Each patch's boxes are shifted by its window's top-left corner, the boxes of all
patches of a scene are pooled, and class-wise rotated NMS keeps one box per
object (the same object seen by two overlapping patches gives two boxes).
Windows are any sequence whose first two entries are ``x0, y0`` (such as
:class:`rkd.data.tiling.Window`); patch ids follow DOTA's devkit,
``<scene_id>__<scale>__<x0>___<y0>`` (:func:`rkd.data.tiling.patch_id`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rkd.geometry import batched_rotated_nms

Detections = dict[str, Tensor]  # boxes (M, 5) le90, scores (M,), labels (M,); optional polys (M, 8) as given

# DOTA's devkit merges patch results with NMS at this IoU.
DEFAULT_MERGE_IOU = 0.3


_PATCH_ID = re.compile(r"^(?P<scene>.+)__(?P<scale>[0-9.]+)__(?P<x0>-?\d+)___(?P<y0>-?\d+)$")


def parse_patch_id(image_id: str) -> tuple[str, int, int] | None:
    """``(scene_id, x0, y0)`` of a devkit patch id at scale 1, or ``None`` if ``image_id`` is not one.

    >>> parse_patch_id("P0001__1__824___0"), parse_patch_id("P0001")
    (('P0001', 824, 0), None)
    """
    match = _PATCH_ID.match(image_id)
    if match is None or float(match["scale"]) != 1.0:
        return None
    return match["scene"], int(match["x0"]), int(match["y0"])


def to_scene(det: Mapping[str, Any], window: Sequence[int]) -> Detections:
    """Detections of a patch in the scene's pixels (boxes shifted by the window's ``x0, y0``).

    >>> to_scene({"boxes": torch.tensor([[1.0, 2, 4, 2, 0.1]]), "scores": torch.tensor([0.9]),
    ...           "labels": torch.tensor([0])}, (100, 50, 200, 150))["boxes"].tolist()
    [[101.0, 52.0, 4.0, 2.0, 0.10000000149011612]]
    """
    boxes = torch.as_tensor(det["boxes"]).clone().reshape(-1, 5)
    boxes[:, 0] += window[0]
    boxes[:, 1] += window[1]
    out = {"boxes": boxes, "scores": torch.as_tensor(det["scores"]), "labels": torch.as_tensor(det["labels"])}
    if "polys" in det:  # the polygons as given travel along, so evaluation can use them
        polys = torch.as_tensor(det["polys"]).clone().reshape(-1, 8)
        polys[:, 0::2] += window[0]
        polys[:, 1::2] += window[1]
        out["polys"] = polys
    return out


def nms_merge(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = DEFAULT_MERGE_IOU, polys: Tensor | None = None
) -> Detections:
    """Class-wise rotated NMS of pooled scene boxes; the kept ones by descending score (with their ``polys``)."""
    if len(boxes):
        keep = batched_rotated_nms(boxes, scores, labels, iou_threshold)
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
    else:
        keep = torch.zeros(0, dtype=torch.long)
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if polys is not None:
        out["polys"] = polys[keep]
    return out


def merge_patches(
    patches: Iterable[tuple[Sequence[int], Mapping[str, Any]]], iou_threshold: float = DEFAULT_MERGE_IOU
) -> Detections:
    """One scene's detections from ``(window, patch detections)`` pairs (see module doc).

    >>> det = {"boxes": torch.tensor([[10.0, 10, 8, 4, 0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    >>> seen_again = {**det, "boxes": torch.tensor([[5.0, 10, 8, 4, 0]]), "scores": torch.tensor([0.8])}
    >>> merged = merge_patches([((0, 0, 20, 20), det), ((5, 0, 25, 20), seen_again)])
    >>> merged["boxes"].tolist(), merged["labels"].tolist()
    ([[10.0, 10.0, 8.0, 4.0, 0.0]], [1])
    """
    shifted = [to_scene(det, window) for window, det in patches]
    if not shifted:
        return {"boxes": torch.zeros(0, 5), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    dtype = torch.promote_types(shifted[0]["boxes"].dtype, shifted[0]["scores"].dtype)
    boxes = torch.cat([d["boxes"].to(dtype) for d in shifted])
    scores = torch.cat([d["scores"].to(dtype) for d in shifted])
    labels = torch.cat([d["labels"].long() for d in shifted])
    polys = torch.cat([d["polys"].to(dtype) for d in shifted]) if all("polys" in d for d in shifted) else None
    return nms_merge(boxes, scores, labels, iou_threshold, polys)


def merge_patch_predictions(
    predictions: Mapping[str, Mapping[str, Any]], iou_threshold: float = DEFAULT_MERGE_IOU
) -> dict[str, Detections]:
    """``{patch_id: detections}`` -> ``{scene_id: detections}``; ids that are not patch ids pass through."""
    groups: dict[str, list[tuple[tuple[int, int], Mapping[str, Any]]]] = {}
    tiled: set[str] = set()
    for image_id, det in predictions.items():
        parsed = parse_patch_id(image_id)
        scene, x0, y0 = parsed if parsed is not None else (image_id, 0, 0)
        if parsed is not None:
            tiled.add(scene)
        groups.setdefault(scene, []).append(((x0, y0), det))
    return {
        scene: merge_patches(items, iou_threshold) if scene in tiled else dict(items[0][1])
        for scene, items in groups.items()
    }
