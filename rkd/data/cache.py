"""Decoded pixels kept for reuse: tiled patches on disk, small datasets in memory.

A 1024 px patch cut from a 4000 x 4000 PNG costs a decode of the whole scene (~0.35 s); the
same patch read back as ``.npy`` costs well under a millisecond. So the patches of a tiled
dataset are decoded once and kept as ``(3, H, W)`` uint8 arrays (the tensor layout: a hit needs
no copy) in ``<cache>/v1/<sha256 of the scene file>/<x0>_<y0>_<x1>_<y1>.npy``, where ``<cache>``
is ``$RKD_PATCH_CACHE``, else ``patches`` in rkd's cache folder (``$RKD_CACHE_DIR``, else
``~/.cache/rkd``). Every trial, worker and process of the machine (and every node, when the
folder is shared) reads the same entries. Nothing is evicted while training: ``rkd cache ls`` shows
the cache's size and ``rkd cache prune --patches`` frees it (:func:`scenes`, :func:`prune_scenes`).

The key is the hash of the file's *bytes*, not its path or modification time: a copy of the
data elsewhere (another node, another mount) finds the entries, and a file rewritten in place,
even with the same size and mtime, gets a new key, so stale pixels are never returned (the old
entries are just left unused). Hashing a 23 MB scene costs ~25 ms, once per process: the digest
is remembered by (path, size, mtime_ns, ctime_ns, inode); ctime changes on every write and
cannot be set back (unlike mtime), so an in-place rewrite is hashed again. The window is in the
entry's name; nothing is resized before caching (letterboxing happens after), so no other
parameter enters the key. On a miss the whole scene is decoded once and all its windows in the
dataset are kept, by the loader process that asked, so the cache fills during the first epoch
(already 8-15x today's loading on the benchmark, docs/benchmarks.md). Where the trials run on the
machine that starts them, :func:`rkd.data.cache_build.fill_patch_cache` fills it before training,
once for all trials, with progress lines.
``v1`` names the decoding rules of :func:`rkd.data.images.to_rgb8`; bump it when they change.

Entries are written with :func:`rkd.atomic.atomic_write_bytes`: two processes that build the
same entry at once both write whole files and the last rename wins with identical bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (the doctests use it)
from torch import Tensor

from rkd import storage
from rkd.atomic import atomic_write_bytes
from rkd.errors import DataError

ENV = "RKD_PATCH_CACHE"
FORMAT = "v1"

# File digests by (kind, path, size, mtime_ns, ctime_ns, inode): one entry (~200 bytes) per file
# and kind; cleared when full, which only costs hashing again.
_digests: dict[tuple[str, str, int, int, int, int], str] = {}
DIGESTS_KEPT = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get(ENV) or storage.cache_root() / "patches")


def _stat_key(path: Path) -> tuple[str, int, int, int, int]:
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def remembered_digest(path: Path, kind: str, compute: Callable[[Path, int], str]) -> str:
    """``compute(path, size)``, remembered in this process by ``kind`` until the file's stat changes."""
    key = (kind, *_stat_key(path))
    digest = _digests.get(key)
    if digest is None:
        digest = compute(path, key[2])
        if (kind, *_stat_key(path)) == key:  # not remembered when the file changed while it was read
            if len(_digests) >= DIGESTS_KEPT:
                _digests.clear()
            _digests[key] = digest
    return digest


def _sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, remembered in this process until the file's stat changes."""
    return remembered_digest(path, "sha256", _sha256)


def entry_path(digest: str, window: tuple[int, int, int, int]) -> Path:
    x0, y0, x1, y1 = window
    return cache_dir() / FORMAT / digest[:2] / digest / f"{x0}_{y0}_{x1}_{y1}.npy"


def load_patch(path: Path, window: tuple[int, int, int, int]) -> np.ndarray | None:
    """The kept ``(3, H, W)`` uint8 pixels of ``window`` of the image file ``path``, or None."""
    try:
        array = np.load(entry_path(file_digest(path), window))
    except (OSError, ValueError):  # absent or unreadable (or the image is): decoded as on a miss
        return None
    x0, y0, x1, y1 = window
    if array.dtype != np.uint8 or array.shape != (3, y1 - y0, x1 - x0):
        return None
    return array


def store_patch(path: Path, window: tuple[int, int, int, int], array: np.ndarray) -> None:
    entry = entry_path(file_digest(path), window)
    try:
        atomic_write_bytes(entry, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))
    except OSError as e:
        raise DataError(
            f"patch cache {cache_dir()}: cannot write {entry.name}: {e.strerror or e}; "
            f"point ${ENV} at a writable folder or set data.patch_cache: false"
        ) from None


@dataclass(frozen=True)
class KeptScene:
    """The kept patches of one scene file."""

    digest: str  # sha256 of the scene file's bytes
    path: Path  # the folder of its patches
    patches: int
    bytes: int
    built: float  # when its newest patch was written (epoch seconds)


def scenes() -> list[KeptScene]:
    """The scenes with kept patches, oldest first."""
    root = cache_dir() / FORMAT
    found = []
    for folder in root.glob("*/*") if root.is_dir() else []:
        files = [f.stat() for f in folder.glob("*.npy")]
        if files:
            size, built = sum(f.st_size for f in files), max(f.st_mtime for f in files)
            found.append(KeptScene(folder.name, folder, len(files), size, built))
    return sorted(found, key=lambda scene: scene.built)


def prune_scenes(older_than_days: float | None = None) -> list[KeptScene]:
    """Delete the kept patches of every scene, or of those built more than ``older_than_days`` ago
    (a later epoch that needs them decodes the scene again); returns the deleted scenes."""
    limit = None if older_than_days is None else time.time() - older_than_days * 86400
    gone = [scene for scene in scenes() if limit is None or scene.built < limit]
    for scene in gone:
        shutil.rmtree(scene.path, ignore_errors=True)
    return gone


class MemoryCache:
    """Decoded images by key, kept while they fit in ``limit_bytes`` (then new ones are not kept).

    What is kept first stays: a dataset larger than the limit keeps a fixed part of it in memory,
    rather than churning every epoch as least-recently-used eviction would under random order.
    Callers must not modify a returned tensor in place (rkd's transforms never do).

    >>> cache = MemoryCache(limit_bytes=8)
    >>> [cache.get(k, lambda: torch.zeros(6, dtype=torch.uint8)).numel() for k in (1, 2, 1)], sorted(cache.kept)
    ([6, 6, 6], [1])
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self.kept: dict[object, Tensor] = {}
        self.used = 0

    def get(self, key: object, load: Callable[[], Tensor]) -> Tensor:
        image = self.kept.get(key)
        if image is None:
            image = load()
            size = image.numel() * image.element_size()
            if self.used + size <= self.limit_bytes:
                self.kept[key] = image
                self.used += size
        return image

    def __getstate__(self) -> dict[str, object]:
        # A dataset shipped to a loader worker starts empty: the worker fills its own share.
        return {"limit_bytes": self.limit_bytes, "kept": {}, "used": 0}
