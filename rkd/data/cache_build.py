"""Filling the patch cache before training, with progress lines.

Left to itself the patch cache (:mod:`rkd.data.cache`) fills during the first epoch, by whichever
loader process first asks for a scene. In a search, several trials start together and each
decodes the same scenes in its first epoch, with nothing shown but a slow epoch. So when the trials
run on this machine, ``rkd search`` and ``rkd train`` fill the cache once, before the teacher stage,
and say how far they are: every scene with a window not kept yet is decoded once, in a few
threads (Pillow decodes with the GIL released), and all its windows are written. Scenes already
kept cost a hash of their bytes; a changed file has a new hash, so it is decoded again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rkd.data import cache
from rkd.data.dataset import build_dataset
from rkd.data.tiling import PatchCrop

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class PatchCacheFill:
    """What :func:`fill_patch_cache` found and did."""

    scenes: int  # tiled scene files of the data (both splits)
    decoded: int  # of them, decoded now (the others were kept already)
    patches: int  # windows written now
    seconds: float


def scenes_to_decode(crops: list[PatchCrop]) -> list[PatchCrop]:
    """One crop per scene file with a window the cache lacks (its decode keeps every window)."""
    missing = []
    for crop in crops:
        digest = cache.file_digest(crop.source.image_path)
        if not all(cache.entry_path(digest, w).is_file() for w in crop.siblings):
            missing.append(crop)
    return missing


def scene_crops(data_spec: dict[str, Any]) -> list[PatchCrop]:
    """One cached :class:`PatchCrop` per scene file of the train and val splits (none when the
    data is not tiled or ``patch_cache`` is off)."""
    if data_spec.get("tile") is None or not data_spec.get("patch_cache", True):
        return []
    by_path: dict[str, PatchCrop] = {}
    for split in ("train", "val"):
        for record in build_dataset(data_spec, split, train=False).records:
            crop = record.render
            if isinstance(crop, PatchCrop) and crop.cached and crop.source.image_path is not None:
                by_path.setdefault(str(crop.source.image_path), crop)
    return list(by_path.values())


def fill_patch_cache(
    data_spec: dict[str, Any],
    log: Callable[[str], None] = print,
    threads: int | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> PatchCacheFill:
    """Decode every tiled scene of ``data_spec`` whose windows are not all kept, and keep them."""
    start = time.perf_counter()
    crops = scene_crops(data_spec)
    if not crops:
        return PatchCacheFill(0, 0, 0, 0.0)
    todo = scenes_to_decode(crops)
    if not todo:
        log(f"[data] patch cache: the windows of all {len(crops)} scene(s) are kept in {cache.cache_dir()}")
        return PatchCacheFill(len(crops), 0, 0, time.perf_counter() - start)
    threads = threads or data_spec.get("workers") or min(4, os.cpu_count() or 1)
    windows = sum(len(c.siblings) for c in todo)
    log(
        f"[data] patch cache: decoding {len(todo)} of {len(crops)} scene(s) once, {windows} window(s), "
        f"into {cache.cache_dir()} ({threads} thread(s))"
    )
    done = patches = 0
    shown = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # map keeps the order, so an unreadable scene raises its DataError here, naming its file
        for crop, _ in zip(todo, pool.map(PatchCrop.decode, todo)):
            done += 1
            patches += len(crop.siblings)
            now = time.perf_counter()
            if now - shown >= progress_every_s and done < len(todo):
                shown = now
                rate = done / (now - start)
                log(
                    f"[data] patch cache: {done}/{len(todo)} scene(s) decoded ({100 * done / len(todo):.0f}%), "
                    f"about {(len(todo) - done) / rate:.0f}s left"
                )
    seconds = time.perf_counter() - start
    log(f"[data] patch cache: kept {patches} window(s) of {len(todo)} scene(s) in {seconds:.0f}s")
    return PatchCacheFill(len(crops), len(todo), patches, seconds)
