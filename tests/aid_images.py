"""AID scene images for tests, read from ../shared/data/aid150 (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rkd.data.dataset import MEAN, STD
from rkd.data.images import read_image

AID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aid150"


def load_aid(classes: list[str], per_class: int, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images (sorted names) of each class, resized and ImageNet-normalised."""
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((AID / split / name).glob("*.jpg"))[:per_class]:
            images.append(read_image(path))
            labels.append(label)
    x = F.interpolate(torch.stack(images).float().div(255), size=(size, size), mode="bilinear", antialias=True)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)
