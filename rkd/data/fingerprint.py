"""A dataset's fingerprint: the key under which teachers, teacher outputs and parsed labels are kept.

The key covers the spec's ``data:`` section and the *content* of every file under ``root``, not
the files' modification times: a dataset copied to another disk or cluster node (``cp`` without
``-p``, ``rsync`` without ``-t``, a re-created mount) has new mtimes but the same files, and must
not retrain a teacher that took hours. Hashing every byte of a large dataset on every trial would
cost minutes, so each file contributes its relative name, its size and a digest of its content:
the whole file up to ``WHOLE_FILE_BYTES`` (label files, small chips), else its first and last
``SAMPLE_BYTES`` (a re-encoded or replaced image changes its header or its tail, and almost
always its size). Digests are remembered in the process as the patch cache's are
(:func:`rkd.data.cache.remembered_digest`, by path and stat): a file changed in place is read again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rkd.data.cache import remembered_digest

WHOLE_FILE_BYTES = 1 << 20
SAMPLE_BYTES = 1 << 16


def sampled_digest(path: Path, size: int) -> str:
    """blake2b of the whole file when it has at most ``WHOLE_FILE_BYTES``, else of its first and last ``SAMPLE_BYTES``."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_BYTES:
            h.update(fh.read())
        else:
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(size - SAMPLE_BYTES)
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def dataset_fingerprint(data_spec: dict[str, Any]) -> str:
    """A stable hash of the spec and, for file formats, of every file's relative name, size and content digest."""
    h = hashlib.sha256(json.dumps(data_spec, sort_keys=True, default=str).encode())
    root = data_spec.get("root")
    if root:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                size = path.stat().st_size
                h.update(f"{rel}:{size}:{remembered_digest(path, 'sampled', sampled_digest)}".encode())
    return h.hexdigest()[:16]
