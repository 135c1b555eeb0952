"""From a spec's ``data:`` section to batches: validation, datasets, collation, fingerprints.

``data_spec`` is the validated dict of a spec's ``data:`` section::

    {format: synthetic|ucas|dota|voc|dior|hrsc|coco, root: str|None, train_split, val_split, input_size,
     classes: list[str]|None, num_train, num_val, num_classes, seed, on_error: raise|skip,
     tile: {size, overlap, min_area}|None, augment: {flip, rot90, scale, color},
     workers: int|None, patch_cache: bool, memory_mb: int}

``workers``, ``patch_cache`` and ``memory_mb`` (see :func:`loader_entries`) only change how fast
batches come, so they appear in the validated dict only when the spec sets them: the hashes of
runs and kept teachers that do not set them stay as they were.

``tile`` cuts large scenes into overlapping patches on the fly (file formats only);
val mAP is then measured on whole scenes, the patches' detections merged back
(:mod:`rkd.eval.merge`). ``augment`` applies to the train split only.

File formats read labels eagerly (a bad line fails at start with ``file:line``)
and images lazily; the synthetic set renders its images on access.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rkd.data.cache import MemoryCache
from rkd.data.dota import named_classes
from rkd.data.fingerprint import dataset_fingerprint
from rkd.data.formats import READERS
from rkd.data.sample import DetectionRecord, ReadReport, Sample
from rkd.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from rkd.data.synthetic import SyntheticAerial
from rkd.data.tiling import DEFAULT_MIN_AREA_FRACTION, DEFAULT_OVERLAP, DEFAULT_SIZE, Window, tile_records
from rkd.data.transforms import letterbox, random_color_jitter, random_flip, random_rot90, random_scale_crop
from rkd.errors import DataError, SpecError
from rkd.inputs import IMAGENET_MEAN as MEAN
from rkd.inputs import IMAGENET_STD as STD
from rkd.outputs import Targets

FORMATS = ("synthetic", *READERS)
DATA_KEYS = {
    "format",
    "root",
    "train_split",
    "val_split",
    "input_size",
    "classes",
    "num_train",
    "num_val",
    "num_classes",
    "seed",
    "on_error",
    "tile",
    "augment",
    "workers",
    "patch_cache",
    "memory_mb",
}
DEFAULT_MEMORY_MB = 1024
DEFAULT_AUGMENT = {"flip": True, "rot90": False, "scale": None, "color": 0.0}
SKIPPED_FILE = "skipped_lines.txt"  # in a run folder: every label line a run left out, "file:line: why"

log = logging.getLogger(__name__)


def _int(d: dict[str, Any], key: str, default: int, low: int) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(key, f"expected an integer, got {value!r}")
    if value < low:
        raise SpecError(key, f"must be >= {low}, got {value}")
    return value


def _number(d: dict[str, Any], key: str, where: str, default: float, low: float, high: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SpecError(f"{where}.{key}", f"expected a number in [{low}, {high}], got {value!r}")
    return value


def _tile(d: Any) -> dict[str, Any] | None:
    if d is None or d is False:
        return None
    if d is True:
        d = {}
    if not isinstance(d, dict) or set(d) - {"size", "overlap", "min_area"}:
        raise SpecError("tile", f"expected {{size, overlap, min_area}} (or true for 1024/200/0.7), got {d!r}")
    try:
        size = _int(d, "size", DEFAULT_SIZE, 32)
        overlap = _int(d, "overlap", DEFAULT_OVERLAP, 0)
    except SpecError as err:
        raise err.within("tile") from None
    if overlap >= size:
        raise SpecError("tile.overlap", f"must be smaller than tile.size {size}, got {overlap}")
    return {
        "size": size,
        "overlap": overlap,
        "min_area": _number(d, "min_area", "tile", DEFAULT_MIN_AREA_FRACTION, 0.0, 1.0),
    }


def _augment(d: Any) -> dict[str, Any]:
    if d is None:
        return dict(DEFAULT_AUGMENT)
    if not isinstance(d, dict) or set(d) - set(DEFAULT_AUGMENT):
        raise SpecError("augment", f"expected a mapping with keys among {sorted(DEFAULT_AUGMENT)}, got {d!r}")
    out = {**DEFAULT_AUGMENT, **d}
    for key in ("flip", "rot90"):
        if not isinstance(out[key], bool):
            raise SpecError(f"augment.{key}", f"expected true or false, got {out[key]!r}")
    scale = out["scale"]
    if scale is not None and not (
        isinstance(scale, list)
        and len(scale) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
        and 0 < scale[0] <= scale[1]
    ):
        raise SpecError(
            "augment.scale", f"expected [low, high] with 0 < low <= high (random scale crop), got {scale!r}"
        )
    out["color"] = _number(out, "color", "augment", 0.0, 0.0, 1.0)  # jitter amount of brightness/contrast/saturation
    return out


def loader_entries(d: dict[str, Any]) -> dict[str, Any]:
    """The loader settings the spec sets, checked (absent ones are left out; see module doc).

    ``workers``: loader worker processes per training process (0: load in the training process;
    null or absent: from the device and the CPUs of each Ray worker, :func:`rkd.data.loading.default_workers`).
    ``patch_cache``: keep decoded patches of tiled scenes on disk (:mod:`rkd.data.cache`; default
    true). ``memory_mb``: MiB of decoded images each split keeps in memory across epochs, shared
    out over the loader's processes (default 1024; 0 keeps none).

    >>> loader_entries({"workers": -1})
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: workers: expected an integer >= 0 or null (from the CPUs per Ray worker), got -1
    """
    out: dict[str, Any] = {}
    workers = d.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise SpecError("workers", f"expected an integer >= 0 or null (from the CPUs per Ray worker), got {workers!r}")
    if "workers" in d:
        out["workers"] = workers
    if "patch_cache" in d:
        if not isinstance(d["patch_cache"], bool):
            raise SpecError("patch_cache", f"expected true or false, got {d['patch_cache']!r}")
        out["patch_cache"] = d["patch_cache"]
    if "memory_mb" in d:
        out["memory_mb"] = _int(d, "memory_mb", DEFAULT_MEMORY_MB, 0)
    return out


def common_entries(d: dict[str, Any], default_size: int) -> tuple[int, str, list[str] | None]:
    """``input_size``, ``on_error`` and ``classes``, checked: the entries every data section has."""
    size = d.get("input_size", default_size)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise SpecError("input_size", f"must be a positive multiple of 32, got {size!r}")
    on_error = d.get("on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise SpecError("on_error", f"expected 'raise' or 'skip', got {on_error!r}")
    classes = d.get("classes")
    if isinstance(classes, str):  # a known list by name: classes: dota-v1.0
        try:
            classes = named_classes(classes)
        except DataError as err:
            raise SpecError("classes", str(err)) from None
    if classes is not None and (
        not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
    ):
        raise SpecError("classes", f"expected a non-empty list of class names or a list's name, got {classes!r}")
    if classes is not None and len(set(classes)) != len(classes):
        raise SpecError("classes", f"class names repeat: {classes}")
    return size, on_error, classes


def validate_data_spec(d: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults and check every entry; errors are :class:`SpecError` relative to ``data``.

    >>> validate_data_spec({"format": "synthetic", "input_size": 128})["num_classes"]
    3
    >>> validate_data_spec({"format": "synthetic", "input_size": 300})
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: input_size: must be a positive multiple of 32, got 300
    """
    if not isinstance(d, dict):
        raise SpecError("", f"expected a mapping, got {d!r}")
    for key in d:
        if key not in DATA_KEYS:
            raise SpecError(str(key), f"unknown key; allowed: {', '.join(sorted(DATA_KEYS))}")
    fmt = d.get("format")
    if fmt not in FORMATS:
        raise SpecError("format", f"expected one of {list(FORMATS)}, got {fmt!r}")
    size, on_error, classes = common_entries(d, default_size=512)
    out = {
        "format": fmt,
        "root": None,
        "train_split": str(d.get("train_split", "train")),
        "val_split": str(d.get("val_split", "val")),
        "input_size": size,
        "classes": classes,
        "num_train": _int(d, "num_train", 64, 1),
        "num_val": _int(d, "num_val", 16, 1),
        "num_classes": _int(d, "num_classes", len(classes) if classes else 3, 1),
        "seed": _int(d, "seed", 0, 0),
        "on_error": on_error,
        "tile": _tile(d.get("tile")),
        "augment": _augment(d.get("augment")),
        **loader_entries(d),
    }
    if fmt == "synthetic" and out["tile"] is not None:
        raise SpecError("tile", "the synthetic set has no large scenes to tile; tiling is for file formats")
    if fmt == "synthetic":
        if out["num_classes"] > len(SYNTHETIC_CLASSES):
            raise SpecError("num_classes", f"the synthetic set has at most {len(SYNTHETIC_CLASSES)} classes")
        if classes is not None and classes != SYNTHETIC_CLASSES[: len(classes)]:
            raise SpecError("classes", f"the synthetic classes are {SYNTHETIC_CLASSES}; omit 'classes' or use a prefix")
        return out
    root = d.get("root")
    if not isinstance(root, str) or not root:
        raise SpecError("root", f"a {fmt} dataset needs 'root', the folder that holds it")
    if not Path(root).is_dir():
        raise SpecError("root", f"folder does not exist: {root}")
    out["root"] = str(Path(root))
    return out


def class_names(data_spec: dict[str, Any]) -> list[str]:
    """The class names of the dataset, in label order."""
    if data_spec["format"] == "synthetic":
        return SYNTHETIC_CLASSES[: data_spec["num_classes"]]
    if data_spec.get("classes"):
        return list(data_spec["classes"])
    _, names, _ = _read(data_spec, "train")
    return names


# The splits read in this process, by split and data fingerprint (spec, and every file's name, size
# and content digest): trials that one process runs in turn (Tune reuses a trial's process for the next) parse
# the labels once. Sharing them is safe because records are never changed after reading: every epoch
# of a run already reuses the same ones.
_READ: dict[tuple[str, str], tuple[list[DetectionRecord], list[str], ReadReport]] = {}
READ_KEPT = 4  # splits kept (the oldest goes first): a search reads two, train and val


def _read(data_spec: dict[str, Any], split: str) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    key = (split, dataset_fingerprint(data_spec))
    if key not in _READ:
        if len(_READ) >= READ_KEPT:
            _READ.pop(next(iter(_READ)))
        _READ[key] = _read_files(data_spec, split)
    return _READ[key]


def _read_files(data_spec: dict[str, Any], split: str) -> tuple[list[DetectionRecord], list[str], ReadReport]:
    split_name = data_spec["train_split"] if split == "train" else data_spec["val_split"]
    reader = READERS[data_spec["format"]]
    return reader(Path(data_spec["root"]), split_name, data_spec.get("classes"), on_error=data_spec["on_error"])


class DetectionDataset(Dataset):
    """Letterboxed samples of a list of records, augmented when ``train``.

    A tiled dataset also keeps its ``scenes`` and, per record, ``windows[i] =
    (scene index, window)`` so evaluation can merge patch detections into scenes.
    """

    def __init__(
        self,
        records: list[DetectionRecord],
        input_size: int,
        train: bool,
        class_names: list[str],
        augment: dict[str, Any] | None = None,
        memory_bytes: int = 0,
    ) -> None:
        self.records, self.input_size, self.train = records, input_size, train
        self.memory = MemoryCache(memory_bytes)  # decoded images, by record index, across epochs
        self.class_names = list(class_names)
        self.augment = dict(DEFAULT_AUGMENT if augment is None else augment)
        self.report: ReadReport | None = None
        self.scenes: list[DetectionRecord] | None = None
        self.windows: list[tuple[int, Window]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        sample, _ = letterbox(record.load(self.memory.get(index, record.load_image)), self.input_size)
        if not self.train:
            return sample
        aug = self.augment
        if aug["scale"] is not None:
            # Zoom in or out around the letterboxed image, then pad back to the input size.
            sample = random_scale_crop(sample, self.input_size, tuple(aug["scale"]))
            sample, _ = letterbox(sample, self.input_size)
            sample = replace(sample, scale=1.0)  # the scale no longer maps back to file pixels
        if aug["flip"]:
            sample = random_flip(sample)
        if aug["rot90"]:
            sample = random_rot90(sample)
        if aug["color"] > 0:
            sample = random_color_jitter(sample, aug["color"], aug["color"], aug["color"])
        return sample


def build_dataset(data_spec: dict[str, Any], split: str, train: bool) -> DetectionDataset:
    """The ``"train"`` or ``"val"`` split of a validated data spec."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data_spec["format"] == "synthetic":
        # The two splits draw from different seeds so val images are never training images.
        n = data_spec["num_train"] if split == "train" else data_spec["num_val"]
        seed = data_spec["seed"] * 2 + (0 if split == "train" else 1)
        source = SyntheticAerial(n, data_spec["input_size"], data_spec["num_classes"], seed=seed)
        memory = memory_budget(data_spec, train)
        names = source.class_names
        return DetectionDataset(source.records, data_spec["input_size"], train, names, data_spec.get("augment"), memory)
    records, names, report = _read(data_spec, split)
    log_skipped(report, f"{data_spec['root']} split {split!r}")
    if not records:
        raise DataError(f"{data_spec['root']}: split {split!r} holds no images")
    tile = data_spec.get("tile")
    memory = memory_budget(data_spec, train)
    if tile is None:
        dataset = DetectionDataset(records, data_spec["input_size"], train, names, data_spec.get("augment"), memory)
    else:
        cached = data_spec.get("patch_cache", True)
        patches = tile_records(records, tile["size"], tile["overlap"], tile["min_area"], patch_cache=cached)
        dataset = DetectionDataset(patches, data_spec["input_size"], train, names, data_spec.get("augment"), memory)
        dataset.scenes = records
        # Each patch's render knows its scene record and window: no second tiling pass.
        scene_index = {id(r): i for i, r in enumerate(records)}
        dataset.windows = [(scene_index[id(p.render.source)], p.render.window) for p in patches]
    dataset.report = report
    return dataset


def memory_budget(data_spec: dict[str, Any], train: bool) -> int:
    """Bytes of decoded images one loading process of a split keeps: ``memory_mb`` shared out over
    the train loader's workers (each worker process keeps its own), the whole of it for val (loaded
    by the training process)."""
    processes = max(1, data_spec.get("workers") or 0) if train else 1
    return int(data_spec.get("memory_mb", DEFAULT_MEMORY_MB)) * 2**20 // processes


def log_skipped(report: ReadReport, what: str) -> None:
    """One log warning naming every line the reader left out (``on_error: skip``, degenerate polygons)."""
    if report.skipped:
        lines = "".join(f"\n  {line}" for line in report.skipped)
        log.warning("%s: %d label line(s) skipped:%s", what, len(report.skipped), lines)


def skipped_lines(data_spec: dict[str, Any]) -> list[str]:
    """Every label line the train and val splits of a validated file-format spec leave out (``file:line: why``)."""
    if data_spec["format"] == "synthetic":
        return []
    out: list[str] = []
    for split in ("train", "val"):
        out += _read(data_spec, split)[2].skipped
    return list(dict.fromkeys(out))  # a split read twice (train == val) lists a line once


def write_skipped(lines: list[str], run_dir: Path) -> Path | None:
    """Write ``lines`` to ``run_dir/skipped_lines.txt`` (nothing when there are none); returns the path."""
    if not lines:
        return None
    from rkd.atomic import atomic_write_bytes

    path = Path(run_dir) / SKIPPED_FILE
    atomic_write_bytes(path, lambda fh: fh.write("".join(f"{line}\n" for line in lines).encode("utf-8")))
    return path


def pixel_key(image: Tensor) -> str:
    """A key of one ``(3, H, W)`` uint8 input: a hash of its shape and pixels (what a frozen
    teacher's outputs depend on; the key of :mod:`rkd.train.teacher_outputs`).

    >>> a = torch.zeros(3, 2, 2, dtype=torch.uint8)
    >>> pixel_key(a) == pixel_key(a.clone()), pixel_key(a) == pixel_key(a.view(3, 4, 1))
    (True, False)
    """
    h = hashlib.blake2b(repr(tuple(image.shape)).encode(), digest_size=16)
    h.update(image.contiguous().numpy().tobytes())
    return h.hexdigest()


def collate_detection(samples: list[Sample], keyed: bool = False) -> tuple[Tensor, Targets, list[dict[str, Any]]]:
    """``(images (B,3,S,S) float normalised, Targets, metas)`` of letterboxed samples; ``keyed``: each
    meta also holds ``pixels``, the sample's :func:`pixel_key` (only the loader of a training that
    keeps teacher outputs asks for it: hashing costs about 0.5 ms a 512 px sample)."""
    images = torch.stack([s.image for s in samples]).float().div_(255.0)
    # In place: the same values as (images - mean) / std, without two more batch-sized buffers
    # (2.6x faster for 1024 px batches, where collation was most of the loader's time).
    images = images.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
    size = (images.shape[-2], images.shape[-1])
    targets = Targets([s.boxes.float() for s in samples], [s.labels.long() for s in samples], size)
    metas = [
        {"image_id": s.image_id, "scale": s.scale, "orig_size": s.orig_size, "difficult": s.difficult} for s in samples
    ]
    if keyed:
        for meta, s in zip(metas, samples):
            meta["pixels"] = pixel_key(s.image)  # the teacher-output cache's key
    return images, targets, metas
