"""Teacher outputs computed once per input and reused by every epoch and every trial.

A frozen teacher gives the same outputs for the same input pixels, yet a search runs its forward
pass on every image in every epoch of every trial (about half of a distilled step on the UCAS
pair, docs/benchmarks.md). So the outputs KD terms read from a one-stage detector - the FPN
features and the head maps (class logits, box regressions, centerness, angle logits) - are kept
per input, in half precision (and rounded so when computed, so a run's results do not depend
on what earlier runs left in the cache), in ``<cache>/<teacher sha256>_<input size>/<key[:2]>/<key>.pt``
where ``<cache>`` is ``$RKD_TEACHER_OUTPUTS``, else ``teacher-outputs`` in rkd's cache folder.

The key is the hash of the sample's input pixels (after letterboxing and augmentation, before
normalisation: :func:`rkd.data.dataset.collate_detection` puts it in each sample's meta as
``pixels`` when the training's loader is keyed, :func:`keeps_outputs`), so an augmentation from a finite set (flips, quarter turns) hits from its second
draw on, and a changed image or teacher can never hit a stale entry. Continuous augmentations
(random scale, colour jitter) would only fill the disk with entries drawn once: the cache is then
off (:func:`cache_refusal`). What is not an activation is taken from a live forward of the
run (the first batch's): the anchors, the detector's description and the head as a function
(DS2D2's amplifiers run the teacher's head on student features: that needs the head's weights,
which the live teacher keeps). A two-stage teacher (RoIs sampled per batch) is never cached.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rkd import storage
from rkd.atomic import atomic_write_bytes
from rkd.data.cache import file_digest
from rkd.outputs import DetectorOutput
from rkd.train.config import TEACHER_CACHE_DEFAULTS

ENV = "RKD_TEACHER_OUTPUTS"
FORMAT = "v1"
# The DetectorOutput fields kept per sample: lists of per-level (B, ...) maps.
CACHED_FIELDS = ("features", "cls_logits", "box_regs", "centerness", "angle_logits")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV) or storage.cache_root() / "teacher-outputs")


def kept() -> list[Path]:
    """Every kept entry (one input's outputs of one teacher)."""
    root = cache_dir() / FORMAT
    return sorted(root.glob("*/*/*.pt")) if root.is_dir() else []


def prune() -> int:
    """Delete every kept entry; returns how many there were."""
    entries = kept()
    shutil.rmtree(cache_dir() / FORMAT, ignore_errors=True)
    return len(entries)


def cache_refusal(augment: dict[str, Any]) -> str | None:
    """Why the teacher outputs of a training with ``augment`` are not cached (None: they are)."""
    if augment.get("scale") is not None:
        return "data.augment.scale draws a new input every step"
    if augment.get("color", 0.0) > 0:
        return "data.augment.color draws a new input every step"
    return None


def cached_maps(out: DetectorOutput) -> list[tuple[str, list[Tensor]]]:
    """The kept fields of an output that has them: ``(name, per-level maps)``."""
    return [(name, getattr(out, name)) for name in CACHED_FIELDS if getattr(out, name) is not None]


def sample_outputs(out: DetectorOutput, i: int) -> dict[str, list[Tensor]]:
    """Sample ``i`` of a batch's cacheable outputs, half precision, on the CPU."""
    return {name: [level[i].detach().to("cpu", torch.float16) for level in levels] for name, levels in cached_maps(out)}


class TeacherOutputCache:
    """The kept outputs of one teacher checkpoint at one input size; ``hits`` and ``misses`` count samples."""

    def __init__(self, teacher_digest: str, input_size: int, limit_bytes: float) -> None:
        self.folder = cache_dir() / FORMAT / f"{teacher_digest}_{input_size}"
        self.limit_bytes = limit_bytes
        self.template: DetectorOutput | None = None  # a live output: anchors, info, head_fn
        self.hits = self.misses = 0
        self.full = False  # the limit was reached: nothing more is written
        self.entries: int | None = None  # entries in the folder, counted once, then as written
        self.live_only = False  # a two-stage teacher: never kept

    def entry(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def outputs(self, teacher: torch.nn.Module, images: Tensor, keys: list[str] | None) -> DetectorOutput:
        """The teacher's outputs on ``images``: kept samples are read, the others computed by
        ``teacher`` (on those images alone: the frozen teacher's BatchNorm uses its running
        statistics, so a sample's outputs do not depend on its batch) and kept."""
        if keys is None or self.live_only:
            return teacher(images)
        kept: list[dict[str, list[Tensor]] | None] = [None] * len(keys)
        if self.template is not None:
            kept = [self.load(key) for key in keys]
        missing = [i for i, k in enumerate(kept) if k is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if len(missing) == len(keys):
            out = teacher(images)
            if out.rois:  # a two-stage teacher: RoIs are sampled per batch, nothing is kept
                self.live_only = True
                return out
            self.template = self.template or out
            if not self.full:
                self.store(keys, [sample_outputs(out, i) for i in range(len(keys))])
            # rounded as a kept entry is: a run's results do not depend on what was kept before it
            return replace(
                out, **{name: [level.half().float() for level in levels] for name, levels in cached_maps(out)}
            )
        if missing:
            out = teacher(images[missing])
            computed = [sample_outputs(out, j) for j in range(len(missing))]
            self.store([keys[i] for i in missing], computed)
            for i, parts in zip(missing, computed):
                kept[i] = parts
        return self.assemble(kept, images)  # type: ignore[arg-type]

    def load(self, key: str) -> dict[str, list[Tensor]] | None:
        try:
            return torch.load(self.entry(key), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):  # absent, or unreadable: computed again
            return None

    def store(self, keys: list[str], samples: list[dict[str, list[Tensor]]]) -> None:
        """Keep each sample's outputs (:func:`sample_outputs`) under its key, until the limit."""
        if self.entries is None:
            self.entries = sum(1 for _ in self.folder.glob("*/*.pt"))
        for key, parts in zip(keys, samples):
            path = self.entry(key)
            if path.is_file() or self.full:
                continue
            atomic_write_bytes(path, lambda fh, parts=parts: torch.save(parts, fh))
            self.entries += 1
            # entries of one teacher and input size are all alike: the size is count x this one's
            if self.entries * path.stat().st_size > self.limit_bytes:
                self.full = True
                return

    def assemble(self, kept: list[dict[str, list[Tensor]]], images: Tensor) -> DetectorOutput:
        """One batch's DetectorOutput from kept samples, on the device and in the dtype of ``images``."""
        template = self.template
        assert template is not None
        fields: dict[str, Any] = {}
        for name in CACHED_FIELDS:
            if getattr(template, name) is None:
                continue
            levels = len(kept[0][name])
            fields[name] = [
                torch.stack([k[name][lvl] for k in kept]).to(images.device, torch.float32) for lvl in range(levels)
            ]
        return replace(template, inputs=images, assignment=None, losses={}, **fields)


def augmented_variants(augment: dict[str, Any]) -> int:
    """How many different inputs the finite augmentations make of one image: flips (none,
    horizontal, vertical, both = a half turn) and quarter turns, together the square's 8 symmetries."""
    flips = 4 if augment.get("flip") else 1
    turns = 4 if augment.get("rot90") else 1
    return min(8, flips * turns)


def input_bytes(teacher: torch.nn.Module, input_size: int) -> int | None:
    """The bytes one input's kept outputs take (fp16 maps; None: a two-stage teacher, never kept)."""
    with torch.no_grad():
        out = teacher.eval()(torch.zeros(1, 3, input_size, input_size))
    if out.rois:
        return None
    return sum(2 * level[0].numel() for _, levels in cached_maps(out) for level in levels)


def readable_size(size: float) -> str:
    """``size`` bytes in MB below a GB, else in GB, to 3 significant digits.

    >>> readable_size(2.5e6), readable_size(31.25e9)
    ('2.5 MB', '31.2 GB')
    """
    return f"{size / 1e6:.3g} MB" if size < 1e9 else f"{size / 1e9:.3g} GB"


def size_line(teacher: torch.nn.Module, input_size: int, inputs: int, augment: dict[str, Any], limit_gb: float) -> str:
    """What the cache of ``teacher``'s outputs on ``inputs`` training inputs will take, said before
    it is built: per input, at most in all, and against the limit (``teacher.cache_gb``). The sizes
    count the kept maps' bytes; each file adds ``torch.save``'s few kB of framing."""
    if (refusal := cache_refusal(augment)) is not None:
        return f"not kept: {refusal} (each step runs the teacher)"
    each = input_bytes(teacher, input_size)
    if each is None:
        return "not kept: a two-stage teacher samples its RoIs per batch (each step runs the teacher)"
    variants = augmented_variants(augment)
    total = each * inputs * variants
    line = (
        f"{each / 1e6:.3g} MB per input x {inputs} training input(s) x {variants} augmented variant(s)"
        f" = about {readable_size(total)} at most in {cache_dir()}"
    )
    limit = limit_gb * 1e9
    if total <= limit:
        return f"{line} (limit {limit_gb:g} GB, teacher.cache_gb)"
    kept = int(limit // each)
    return (
        f"{line}: over the {limit_gb:g} GB limit (teacher.cache_gb), so about {kept} of these "
        f"{inputs * variants} augmented inputs are kept, the first drawn, and the others run the teacher at each step"
    )


def keeps_outputs(cfg: Any, caches: bool) -> bool:
    """Whether a loop config (:class:`rkd.train.config.LoopConfig`) of a task that ``caches`` teacher
    outputs keeps them: ``teacher_cache.mode`` auto, a teacher and KD methods that read it, and no
    continuous augmentation. Known before the loader is built, which then keys its samples."""
    settings = cfg.teacher_cache or {}
    if settings.get("mode", "off") != "auto" or not caches or not cfg.teacher_checkpoint or not cfg.train.methods:
        return False
    return cache_refusal(cfg.data.get("augment") or {}) is None


def build_cache(cfg: Any, caches: bool) -> TeacherOutputCache | None:
    """The cache of a loop config whose task ``caches`` teacher outputs, or None (:func:`keeps_outputs`)."""
    if not keeps_outputs(cfg, caches):
        return None
    digest = file_digest(storage.local_copy(cfg.teacher_checkpoint))
    limit = float((cfg.teacher_cache or {}).get("limit_gb", TEACHER_CACHE_DEFAULTS["limit_gb"])) * 1e9
    return TeacherOutputCache(digest, int(cfg.data["input_size"]), limit)
