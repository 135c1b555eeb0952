"""Detector checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint file holds only tensors and plain Python values::

    {"format": 1, "kind": "detector", "model_spec": {...}, "num_classes": K,
     "class_names": [...], "input_size": S, "state_dict": {...}, "meta": {...}}

The learnable KD parts of a distilled student are saved in a separate file
(``kd_parts.pt``) so that export never sees them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd.errors import RkdError
from rkd.models import build_detector

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file (if any) intact, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))


def save_detector(
    path: Path,
    model: nn.Module,
    model_spec: dict[str, Any],
    class_names: list[str],
    input_size: int,
    meta: dict[str, Any] | None = None,
) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "format": FORMAT_VERSION,
            "kind": "detector",
            "model_spec": model_spec,
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "input_size": int(input_size),
            "state_dict": state,
            "meta": meta or {},
        },
        path,
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RkdError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn, foreign or pickled-object file
        raise RkdError(f"{path}: not a readable rkd checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "detector" or "state_dict" not in ckpt:
        raise RkdError(f"{path}: not an rkd detector checkpoint (missing 'kind: detector' / 'state_dict')")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise RkdError(f"{path}: written by a newer rkd (format {ckpt['format']} > {FORMAT_VERSION})")
    return ckpt


def load_detector(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build the detector a checkpoint describes and load its weights (strictly)."""
    ckpt = read_checkpoint(path)
    model = build_detector(ckpt["model_spec"], ckpt["num_classes"])
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise RkdError(f"{path}: weights do not fit the model spec (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, ckpt
