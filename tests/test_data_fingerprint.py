"""The dataset fingerprint keys kept teachers on file content, not on modification times."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rkd.data import fingerprint
from rkd.data.fingerprint import dataset_fingerprint, sampled_digest


def _dataset(root: Path) -> dict:
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "labels" / "1.txt").write_text("10 10 20 10 20 20 10 20 plane 0\n")
    big = bytes(range(256)) * ((fingerprint.WHOLE_FILE_BYTES + 3 * fingerprint.SAMPLE_BYTES) // 256)
    (root / "images" / "1.png").write_bytes(big)
    return {"format": "dota", "root": str(root), "input_size": 512}


def _touch_all(root: Path, seconds: int) -> None:
    for path in root.rglob("*"):
        os.utime(path, (seconds, seconds))


def test_new_mtimes_keep_the_fingerprint(tmp_path):
    spec = _dataset(tmp_path / "d")
    before = dataset_fingerprint(spec)
    _touch_all(tmp_path / "d", 1_700_000_000)  # a re-created mount or a copy without -p
    assert dataset_fingerprint(spec) == before


def test_content_names_and_spec_change_the_fingerprint(tmp_path):
    root = tmp_path / "d"
    spec = _dataset(root)
    seen = {dataset_fingerprint(spec)}
    label = root / "labels" / "1.txt"
    label.write_text(label.read_text().replace("plane", "ship "))  # same size, new content
    seen.add(dataset_fingerprint(spec))
    image = root / "images" / "1.png"
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # the tail of a file too large to hash whole
    image.write_bytes(bytes(data))
    seen.add(dataset_fingerprint(spec))
    image.rename(root / "images" / "2.png")
    seen.add(dataset_fingerprint(spec))
    seen.add(dataset_fingerprint({**spec, "input_size": 640}))
    assert len(seen) == 5


def test_sampled_digest_matches_blake2b_of_the_hashed_bytes(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"abc" * 1000)
    payload = os.urandom(fingerprint.WHOLE_FILE_BYTES + 12345)
    large.write_bytes(payload)
    n = fingerprint.SAMPLE_BYTES
    assert sampled_digest(small, 3000) == hashlib.blake2b(b"abc" * 1000, digest_size=16).hexdigest()
    expected = hashlib.blake2b(payload[:n] + payload[-n:], digest_size=16).hexdigest()
    assert sampled_digest(large, len(payload)) == expected
