"""Trained teachers kept by content, for every run on this machine.

A teacher depends on its config, the data and the seed, which :func:`rkd.train.teacher.teacher_hash`
digests. Each trained teacher is stored once under ``<cache>/teachers/<hash>/`` (``teacher.pt`` and
``teacher.json``, which names the run that trained it), where ``<cache>`` is ``$RKD_TEACHER_CACHE``,
else ``teachers`` in rkd's cache folder (``$RKD_CACHE_DIR``, else ``~/.cache/rkd``). A later search
or ``rkd train`` whose teacher has the same hash copies it into its own run folder instead of
training it again, whatever its name; the log says so. ``rkd cache ls`` lists what is kept and
``rkd cache prune`` deletes it (only what is named, or everything with ``--all``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rkd import storage
from rkd.errors import RkdError

ENV = "RKD_TEACHER_CACHE"
CHECKPOINT, RECORD = "teacher.pt", "teacher.json"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV) or storage.cache_root() / "teachers")


def lookup(digest: str) -> tuple[Path, dict[str, Any]] | None:
    """The kept checkpoint of a teacher of hash ``digest`` and its record, or None."""
    folder = cache_dir() / digest
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (folder / CHECKPOINT, record) if (folder / CHECKPOINT).is_file() else None


def store(digest: str, checkpoint: Path, record: dict[str, Any]) -> Path:
    """Keep ``checkpoint`` as the teacher of hash ``digest`` (a kept one stays); returns its folder."""
    folder = cache_dir() / digest
    if lookup(digest) is not None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", suffix=".tmp", dir=folder.parent))
    try:
        shutil.copyfile(checkpoint, tmp / CHECKPOINT)
        (tmp / RECORD).write_text(json.dumps({**record, "stored": time.time()}, indent=1))
        os.replace(tmp, folder)  # the whole entry appears at once
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if lookup(digest) is None:  # not another process that stored it first
            raise
    return folder


def entries() -> list[dict[str, Any]]:
    """Every kept teacher: its record with ``hash``, ``path`` and ``bytes``, oldest first."""
    root = cache_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        hit = lookup(folder.name)
        if hit is not None:
            found.append({**hit[1], "hash": folder.name, "path": str(folder), "bytes": hit[0].stat().st_size})
    return sorted(found, key=lambda e: e.get("stored", 0.0))


def prune(hashes: list[str], everything: bool = False, older_than_days: float | None = None) -> list[dict[str, Any]]:
    """Delete the named kept teachers (a unique prefix of a hash names it), all of them, or those
    stored more than ``older_than_days`` ago; returns the deleted entries."""
    kept = entries()
    chosen: dict[str, dict[str, Any]] = {}
    for prefix in hashes:
        matches = [e for e in kept if e["hash"].startswith(prefix)]
        if len(matches) != 1:
            what = "no kept teacher" if not matches else f"{len(matches)} kept teachers"
            raise RkdError(f"{prefix!r} names {what} in {cache_dir()} (see 'rkd cache ls')")
        chosen[matches[0]["hash"]] = matches[0]
    if everything:
        chosen.update({e["hash"]: e for e in kept})
    if older_than_days is not None:
        limit = time.time() - older_than_days * 86400
        chosen.update({e["hash"]: e for e in kept if e.get("stored", 0.0) < limit})
    for entry in chosen.values():
        shutil.rmtree(entry["path"], ignore_errors=True)
    return list(chosen.values())
