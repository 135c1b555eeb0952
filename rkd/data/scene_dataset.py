"""Scene classification batches: a ``data:`` section for class folders, the dataset and its collation.

The ``data`` section of a ``task: classification`` spec::

    {format: scenes, root: str, train_split: train, val_split: val, input_size: 224,
     classes: list[str] | None, max_per_class: int | None, on_error: raise | skip,
     workers: int | None, memory_mb: int}

``workers`` and ``memory_mb`` are the loader settings of :func:`rkd.data.dataset.loader_entries`
(decoded images are kept in memory across epochs up to ``memory_mb``).

Images are read by :func:`rkd.data.scenes.read_scenes` (``root/<split>/<Class>/<image>``),
resized to ``input_size`` squared (scenes have no boxes, so no letterbox is needed), and when
training flipped and rotated by a multiple of 90 degrees (aerial scenes have no canonical "up").
:func:`collate_scenes` normalises with the ImageNet statistics like
:func:`rkd.data.dataset.collate_detection`. ``max_per_class`` keeps the first images (sorted by
name) of each class, for quick runs and searches on a subset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from rkd.data.cache import MemoryCache
from rkd.data.dataset import MEAN, STD, common_entries, loader_entries, memory_budget
from rkd.data.images import read_image
from rkd.data.sample import ReadReport
from rkd.data.scenes import read_scenes
from rkd.errors import DataError, SpecError

SCENE_DATA_KEYS = (
    "format",
    "root",
    "train_split",
    "val_split",
    "input_size",
    "classes",
    "max_per_class",
    "on_error",
    "workers",
    "memory_mb",
)


def validate_scene_data_spec(d: Any) -> dict[str, Any]:
    """Fill defaults and check every entry; errors are :class:`SpecError` relative to ``data``.

    >>> validate_scene_data_spec({"format": "scenes", "root": ".", "input_size": 100})
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: input_size: must be a positive multiple of 32, got 100
    >>> validate_scene_data_spec({"format": "scenes", "root": "."})["max_per_class"] is None
    True
    """
    if not isinstance(d, dict):
        raise SpecError("", f"expected a mapping, got {d!r}")
    for key in d:
        if key not in SCENE_DATA_KEYS:
            raise SpecError(str(key), f"unknown key; allowed: {', '.join(sorted(SCENE_DATA_KEYS))}")
    if d.get("format") != "scenes":
        got = d.get("format")
        raise SpecError("format", f"a classification task reads class folders: expected 'scenes', got {got!r}")
    size, on_error, classes = common_entries(d, default_size=224)
    limit = d.get("max_per_class")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecError("max_per_class", f"expected a positive integer or null, got {limit!r}")
    root = d.get("root")
    if not isinstance(root, str) or not root:
        raise SpecError("root", "a scenes dataset needs 'root', the folder that holds the split folders")
    if not Path(root).is_dir():
        raise SpecError("root", f"folder does not exist: {root}")
    for key in ("train_split", "val_split"):
        if not isinstance(d.get(key, "x"), str):
            raise SpecError(key, f"expected a folder name, got {d[key]!r}")
    return {
        "format": "scenes",
        "root": str(Path(root)),
        "train_split": d.get("train_split", "train"),
        "val_split": d.get("val_split", "val"),
        "input_size": size,
        "classes": list(classes) if classes else None,
        "max_per_class": limit,
        "on_error": on_error,
        **loader_entries(d),
    }


def first_per_class(items: list[tuple[Path, int]], limit: int | None) -> list[tuple[Path, int]]:
    """The first ``limit`` items of each label, in their given order (all when ``limit`` is None).

    >>> first_per_class([(Path("a"), 0), (Path("b"), 0), (Path("c"), 1)], 1)
    [(PosixPath('a'), 0), (PosixPath('c'), 1)]
    """
    if limit is None:
        return list(items)
    taken: dict[int, int] = {}
    out = []
    for path, label in items:
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            out.append((path, label))
    return out


def augment(image: Tensor) -> Tensor:
    """A random horizontal/vertical flip and rotation by ``k * 90`` degrees of a ``(3, S, S)`` image."""
    flips = torch.randint(0, 2, (2,)).tolist()
    if flips[0]:
        image = image.flip(-1)
    if flips[1]:
        image = image.flip(-2)
    return torch.rot90(image, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))


class SceneDataset(Dataset):
    """``(image (3, S, S) float in [0, 255], label)`` per item; random flips and rot90 when ``train``."""

    def __init__(
        self, items: list[tuple[Path, int]], class_names: list[str], input_size: int, train: bool, memory_bytes: int = 0
    ) -> None:
        self.items, self.class_names = list(items), list(class_names)
        self.input_size, self.train = int(input_size), train
        self.memory = MemoryCache(memory_bytes)  # resized images, by index, across epochs
        self.report: ReadReport | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.items[index]
        image = self.memory.get(index, lambda: self._resized(path))
        return (augment(image) if self.train else image), label

    def _resized(self, path: Path) -> Tensor:
        image = read_image(path).float()[None]
        s = self.input_size
        image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        return image.clamp_(0.0, 255.0)


def build_scene_dataset(data_spec: dict[str, Any], split: str, train: bool) -> SceneDataset:
    """The ``"train"`` or ``"val"`` split of a validated scenes data spec."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    folder = data_spec["train_split"] if split == "train" else data_spec["val_split"]
    items, names, report = read_scenes(Path(data_spec["root"]), folder, data_spec.get("classes"), data_spec["on_error"])
    items = first_per_class(items, data_spec.get("max_per_class"))
    if not items:
        raise DataError(f"{data_spec['root']}: split {folder!r} holds no images")
    dataset = SceneDataset(items, names, data_spec["input_size"], train, memory_budget(data_spec, train))
    dataset.report = report
    return dataset


def collate_scenes(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``(images (B, 3, S, S) ImageNet-normalised, labels (B,) long)``.

    >>> x, y = collate_scenes([(torch.full((3, 2, 2), 255.0), 1)])
    >>> round(float(x[0, 0, 0, 0]), 4), y.tolist()
    (2.2489, [1])
    """
    images = torch.stack([image for image, _ in samples]).div_(255.0)
    # In place: the values of (images - mean) / std without two more batch-sized buffers.
    images = images.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
    return images, torch.tensor([label for _, label in samples], dtype=torch.long)
