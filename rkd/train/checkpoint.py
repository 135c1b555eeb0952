"""Model checkpoints and the files of a training run's checkpoints: written atomically, read without
unpickling arbitrary objects.

A model checkpoint file holds only tensors and plain Python values::

    {"format": 1, "kind": "detector", "model_spec": {...}, "num_classes": K,
     "class_names": [...], "input_size": S, "state_dict": {...}, "meta": {...}}

A training run's checkpoint folder holds the student alone (``student.pt``, a model checkpoint:
what export reads), the learnable KD parts of a distilled student apart (``kd_parts.pt``, so that
export never sees them) and the training state needed to resume (``train_state.pt``: optimizer,
scheduler, epoch, RNG, metrics history).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)
from rkd.errors import RkdError
from rkd.models import Classifier, build_classifier, build_model

FORMAT_VERSION = 1
# The files of one checkpoint folder of a training run.
STUDENT_FILE = "student.pt"
KD_PARTS_FILE = "kd_parts.pt"
TRAIN_STATE_FILE = "train_state.pt"
# The checkpoint metric Ray ranks by with ``keep: k``: the epoch's val accuracy, or UNSCORED in epochs
# without evaluation, below every score, so a carried-over score never makes such an epoch look best.
# Not NaN/-inf: Ray's checkpoint snapshot writes those as null and then fails to restore the run.
SCORE_METRIC = "checkpoint_score"
UNSCORED = -1.0

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))


def save_model(
    path: Path,
    model: nn.Module,
    model_spec: dict[str, Any],
    class_names: list[str],
    input_size: int,
    meta: dict[str, Any] | None = None,
    kind: str = "detector",
) -> None:
    """Write a ``kind`` (detector or classifier) checkpoint: tensors and plain values only, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "format": FORMAT_VERSION,
            "kind": kind,
            "model_spec": model_spec,
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "input_size": int(input_size),
            "state_dict": state,
            "meta": meta or {},
        },
        path,
    )


def save_detector(
    path: Path,
    model: nn.Module,
    model_spec: dict[str, Any],
    class_names: list[str],
    input_size: int,
    meta: dict[str, Any] | None = None,
) -> None:
    save_model(path, model, model_spec, class_names, input_size, meta, kind="detector")


def save_classifier(
    path: Path,
    model: nn.Module,
    model_spec: dict[str, Any],
    class_names: list[str],
    input_size: int,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a classifier checkpoint (the detector layout with ``kind: classifier``), atomically."""
    save_model(path, model, model_spec, class_names, input_size, meta, kind="classifier")


def read_checkpoint(path: Path, kind: str = "detector") -> dict[str, Any]:
    """The checkpoint dict of a ``kind`` model; :class:`RkdError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RkdError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn, foreign or pickled-object file
        raise RkdError(f"{path}: not a readable rkd checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or "state_dict" not in ckpt:
        raise RkdError(f"{path}: not an rkd {kind} checkpoint (missing 'kind: {kind}' / 'state_dict')")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise RkdError(f"{path}: written by a newer rkd (format {ckpt['format']} > {FORMAT_VERSION})")
    return ckpt


# Checkpoints read once per process (``load_model(keep=True)``: a teacher), by path, size and mtime:
# the trials that one process runs in turn distil from the same teacher. Only read from, never changed.
_KEPT: dict[tuple[str, str, int, int], dict[str, Any]] = {}
KEPT_CHECKPOINTS = 2


def read_checkpoint_kept(path: Path, kind: str = "detector") -> dict[str, Any]:
    """:func:`read_checkpoint`, kept for the next read of the same unchanged file in this process."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return read_checkpoint(path, kind)  # its error names the file
    key = (str(path.resolve()), kind, stat.st_size, stat.st_mtime_ns)
    if key not in _KEPT:
        if len(_KEPT) >= KEPT_CHECKPOINTS:
            _KEPT.pop(next(iter(_KEPT)))
        _KEPT[key] = read_checkpoint(path, kind)
    return _KEPT[key]


def load_model(
    path: Path,
    kind: str = "detector",
    keep: bool = False,
    build: Callable[[dict[str, Any], int], nn.Module] = build_model,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a ``kind`` checkpoint describes (with ``build``, from its model spec and class
    count) and load its weights (strictly); a new model each call. ``keep``: read the file once per
    process (:func:`read_checkpoint_kept`)."""
    ckpt = read_checkpoint_kept(path, kind) if keep else read_checkpoint(path, kind)
    model = build(ckpt["model_spec"], ckpt["num_classes"])
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise RkdError(
            f"{path}: weights do not fit the model spec (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, ckpt


def load_detector(path: Path, keep: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Build the detector a checkpoint describes and load its weights (strictly)."""
    return load_model(path, "detector", keep)


def load_classifier(path: Path, keep: bool = False) -> tuple[Classifier, dict[str, Any]]:
    """Build the classifier a checkpoint describes (its model spec may leave out ``kind: classifier``)
    and load its weights (strictly)."""
    return load_model(path, "classifier", keep, build=build_classifier)  # type: ignore[return-value]


# --- Ray Train checkpoints of a run (resume) --------------------------------------------------


def read_checkpoint_files(folder: Path, names: list[str]) -> dict[str, Any]:
    """Load the named files of one checkpoint folder (tensors and plain values only).

    Raises ``RkdError`` naming the file when one is missing, torn or not a torch file, so the
    caller can fall back to an older checkpoint instead of crashing mid-resume.
    """
    loaded: dict[str, Any] = {}
    for name in names:
        path = Path(folder) / name
        try:
            loaded[name] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # missing, truncated, bit-flipped, pickled objects
            raise RkdError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return loaded


def older_checkpoints(latest: Any) -> list[Any]:
    """The run's other ``checkpoint_*`` folders written before ``latest``, newest first.

    Ray Train names checkpoint folders ``checkpoint_<date and time>``, so names sort by age.
    The listing goes through the checkpoint's own filesystem, so it works for cloud storage too.
    """
    import pyarrow.fs
    from ray.train import Checkpoint

    parent, own = latest.path.rstrip("/").rsplit("/", 1)
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    names = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    return [Checkpoint(f"{parent}/{name}", filesystem=latest.filesystem) for name in names if name < own]


def load_resume_files(latest: Any) -> tuple[Any, dict[str, Any], str]:
    """The files to resume from: the latest checkpoint's (a ``ray.train.Checkpoint``), or, when those are
    torn or unreadable, the newest older checkpoint that reads. Returns the checkpoint used, its files
    and a warning ("" when the latest was fine). Raises when no checkpoint of the run reads."""
    problems: list[str] = []
    for candidate in [latest, *older_checkpoints(latest)]:
        try:
            with candidate.as_directory() as folder:
                files = read_checkpoint_files(Path(folder), [TRAIN_STATE_FILE, STUDENT_FILE])
        except (RkdError, OSError) as err:
            problems.append(str(err))
            continue
        if not problems:
            return candidate, files, ""
        warning = (
            f"latest checkpoint {latest.path} is unreadable ({problems[0]}); resumed from the older "
            f"{candidate.path} (epoch {int(files[TRAIN_STATE_FILE]['epoch'])})"
        )
        log.warning(warning)
        return candidate, files, warning
    raise RkdError("no checkpoint of this run is readable: " + "; ".join(problems))


def write_run_checkpoint(
    folder: Path,
    student: nn.Module,
    model_spec: dict[str, Any],
    class_names: list[str],
    input_size: int,
    meta: dict[str, Any],
    kind: str,
    state: dict[str, Any],
    with_kd_parts: bool,
) -> None:
    """Write the files of one checkpoint of a training run into ``folder`` (see the module's doc):
    the student, its KD parts (``with_kd_parts``: a distilled student) and the training state."""
    save_model(folder / STUDENT_FILE, student, model_spec, class_names, input_size, meta=meta, kind=kind)
    if with_kd_parts:
        atomic_torch_save(state["kd_parts"], folder / KD_PARTS_FILE)
    atomic_torch_save(state, folder / TRAIN_STATE_FILE)
