"""Small detectors trained briefly on UCAS-AOD scenes (read from ../shared/data/ucas50), and the check that
two sets of detections are the same, for the export and predict tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.geometry import obb_to_hbb
from rkd.models import build_detector
from rkd.outputs import Targets

UCAS = Path("/work/shared/data/ucas50")
SIZE = 128


def spec(kind: str, boxes: str) -> dict:
    return {
        "kind": kind,
        "boxes": boxes,
        "backbone": {"name": "convnet", "width": 0.25, "depth": 1},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }


def ucas_batches() -> tuple[torch.Tensor, Targets, torch.Tensor]:
    """Letterboxed UCAS-AOD train scenes (and their targets) and val scenes, normalised."""
    data = validate_data_spec({"format": "ucas", "root": str(UCAS), "input_size": SIZE})
    train, val = build_dataset(data, "train", train=False), build_dataset(data, "val", train=False)
    images, targets, _ = collate_detection([train[i] for i in range(8)])
    val_images, _, _ = collate_detection([val[i] for i in range(4)])
    return images, targets, val_images


def trained(kind: str, boxes: str, ucas, steps: int = 25) -> torch.nn.Module:
    images, targets = ucas[:2]
    if boxes == "hbb":
        targets = Targets([obb_to_hbb(b) for b in targets.boxes], targets.labels, targets.image_size)
    torch.manual_seed(0)
    model = build_detector(spec(kind, boxes), 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sum(model(images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def same_detections(got: dict, want: dict, oriented: bool) -> None:
    """The same kept set: each reference box has one partner of its class, boxes to 1e-3 px."""
    assert len(got["boxes"]) == len(want["boxes"])
    free = np.ones(len(got["boxes"]), dtype=bool)
    for box, score, label in zip(want["boxes"], want["scores"], want["labels"]):
        diff = np.abs(got["boxes"] - box)
        if oriented:  # le90 angles -pi/2 and pi/2 - 1e-7 are the same box
            diff[:, 4] = np.minimum(diff[:, 4], math.pi - diff[:, 4])
        cost = np.where(free & (got["labels"] == label), diff.max(1), np.inf)
        j = int(cost.argmin())
        assert cost[j] < 1e-3, f"no partner for {box} ({label}, {score}): nearest differs by {cost[j]}"
        assert abs(got["scores"][j] - score) < 1e-5
        free[j] = False
