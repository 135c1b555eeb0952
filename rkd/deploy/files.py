"""What an export folder holds, readable without torch: file names, the model spec, the model's kind.

``rkd predict --backend onnxruntime`` runs from these and :mod:`rkd.deploy.postprocess` alone, so a
deployment machine needs numpy, Pillow and onnxruntime, not torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkd.errors import RkdError
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model_spec.json"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
TORCHSCRIPT_FILE = "model.torchscript.pt"
INT8_FILE = "model.int8.onnx"  # --int8 (rkd.deploy.int8)
CARD_FILE = "model_card.json"
README_FILE = "README.md"
POSTPROCESS_FILE = "postprocess.py"
# The kinds of model an export holds; rkd.train.tasks maps each to its task (a test keeps them in step).
EXPORT_KINDS = ("detector", "classifier")


def exported_kind(folder: Path) -> str:
    """``detector`` or ``classifier``: what the export folder holds (read from ``model_spec.json``)."""
    spec_path = Path(folder) / SPEC_FILE
    if not spec_path.is_file():
        raise RkdError(f"{spec_path}: missing; is {folder} a folder written by 'rkd export'?")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise RkdError(f"{spec_path}: not valid JSON ({exc})") from None
    kind = spec.get("kind", "detector") if isinstance(spec, dict) else None
    if kind not in EXPORT_KINDS:
        raise RkdError(f"{spec_path}: not an rkd model spec (kind {kind!r})")
    return kind


def read_spec(folder: Path) -> dict[str, Any]:
    """``model_spec.json`` of an export folder, with the card's ``input`` section merged in when the card
    is present (exports before end-to-end graphs carry no ``graph``: theirs are raw)."""
    folder = Path(folder)
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise RkdError(f"{spec_path}: missing; is {folder} a folder written by 'rkd export'?")
    try:
        spec = json.loads(spec_path.read_text())
        # Exports made before classifiers could be exported carry no kind: they are detectors.
        spec.setdefault("kind", "detector")
        spec.setdefault("graph", "raw")
        if spec["kind"] not in EXPORT_KINDS:
            raise ValueError(f"unknown kind {spec['kind']!r}")
        int(spec["input_size"]), list(spec["class_names"])  # noqa: B018 - present and well-typed
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RkdError(f"{spec_path}: not an rkd model spec ({type(exc).__name__}: {exc})") from None
    card_path = folder / CARD_FILE
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise RkdError(f"{card_path}: not valid JSON ({exc})") from None
    spec["input"] = card.get("input", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1 / 255})
    return spec
