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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from rkd.data import cache
from rkd.data.dataset import build_dataset
from rkd.data.tiling import PatchCrop

PROGRESS_EVERY_S = 10.0
# Each thread holds a whole decoded scene (a 20000 px RGB scene is 1.2 GB): a few are enough.
MAX_THREADS = 4
MANY_SCENES = 100  # from this many scenes, the check against the cache gets a line of its own


@dataclass(frozen=True)
class PatchCacheFill:
    """What :func:`fill_patch_cache` found and did."""

    scenes: int  # tiled scene files of the data (both splits)
    decoded: int  # of them, decoded now (the others were kept already)
    patches: int  # windows written now
    seconds: float


def scenes_to_decode(
    crops: list[PatchCrop], pool: ThreadPoolExecutor, log: Callable[[str], None], progress_every_s: float
) -> list[PatchCrop]:
    """The crops (one per scene file) whose scene has a window the cache lacks; hashing a scene's
    bytes is what this costs, so it runs in ``pool`` (hashlib releases the GIL) with progress lines."""

    def missing(crop: PatchCrop) -> bool:
        digest = cache.file_digest(crop.source.image_path)
        return not all(cache.entry_path(digest, w).is_file() for w in crop.siblings)

    flags = each_with_progress(pool, missing, crops, "checked", log, progress_every_s)
    return [crop for crop, lacking in zip(crops, flags) if lacking]


def each_with_progress(
    pool: ThreadPoolExecutor,
    fn: Callable[[PatchCrop], Any],
    crops: list[PatchCrop],
    verb: str,
    log: Callable[[str], None],
    progress_every_s: float,
) -> list[Any]:
    """``fn`` of every crop, in ``pool``; a progress line at most every ``progress_every_s``, counted
    as scenes finish (one slow scene does not hold the count back). An error (a scene that does not
    decode: :class:`DataError` naming its file) cancels what has not started and is raised."""
    start = shown = time.perf_counter()
    futures = {pool.submit(fn, crop): i for i, crop in enumerate(crops)}
    results: list[Any] = [None] * len(crops)
    try:
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            now = time.perf_counter()
            if now - shown >= progress_every_s and done < len(crops):
                shown = now
                left = (len(crops) - done) * (now - start) / done
                log(
                    f"[data] patch cache: {done}/{len(crops)} scene(s) {verb} ({100 * done / len(crops):.0f}%), "
                    f"about {left:.0f}s left"
                )
    finally:
        for future in futures:
            future.cancel()
    return results


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
    """Decode every tiled scene of ``data_spec`` whose windows are not all kept, and keep them
    (``threads``: default ``data.workers``, at most :data:`MAX_THREADS`)."""
    start = time.perf_counter()
    crops = scene_crops(data_spec)
    if not crops:
        return PatchCacheFill(0, 0, 0, 0.0)
    threads = threads or max(1, min(data_spec.get("workers") or MAX_THREADS, MAX_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if len(crops) >= MANY_SCENES:
            log(f"[data] patch cache: checking {len(crops)} scene(s) against {cache.cache_dir()}")
        todo = scenes_to_decode(crops, pool, log, progress_every_s)
        if not todo:
            log(f"[data] patch cache: the windows of all {len(crops)} scene(s) are kept in {cache.cache_dir()}")
            return PatchCacheFill(len(crops), 0, 0, time.perf_counter() - start)
        windows = sum(len(c.siblings) for c in todo)
        log(
            f"[data] patch cache: decoding {len(todo)} of {len(crops)} scene(s) once, {windows} window(s), "
            f"into {cache.cache_dir()} ({threads} thread(s))"
        )
        each_with_progress(pool, PatchCrop.decode, todo, "decoded", log, progress_every_s)
    seconds = time.perf_counter() - start
    log(f"[data] patch cache: kept {windows} window(s) of {len(todo)} scene(s) in {seconds:.0f}s")
    return PatchCacheFill(len(crops), len(todo), windows, seconds)
