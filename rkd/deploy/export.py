"""``rkd export``: one student of a finished search, alone, in deployable formats.

The student is a detector, or a scene classifier when the run's accuracy objective
(``summary.json``'s first objective) is ``top1``. An export folder holds (``--format``
picks the weight formats; the cards are always written):

* ``model.safetensors`` - the student's state dict (no adapters, no KD parts);
  with ``model_spec.json`` it rebuilds the :class:`~rkd.models.Detector` or
  :class:`~rkd.models.Classifier` exactly (:func:`load_exported`).
* ``model.onnx`` (opset 17) and ``model.pt2`` (``torch.export``; ``torch.export.load``), dynamic
  batch, the spec's input size. A detector ends in detections
  (:class:`~rkd.deploy.graphs.DetectionNetwork`: decoded boxes and scores; class-wise NMS in
  the ONNX graph for horizontal boxes), finished by ``postprocess.py`` (numpy only, copied
  beside the model: rotated NMS for oriented boxes). ``raw=True`` (``--raw``) writes the raw
  head maps instead (:class:`~rkd.deploy.graphs.RawNetwork`). A classifier:
  ``images (B, 3, S, S) -> logits (B, K)``.
* ``model.int8.onnx`` with ``--int8``: ``model.onnx`` with its network quantised to INT8
  (:mod:`rkd.deploy.int8`); the card gives both graphs' val mAP50 (top-1) in onnxruntime.
* ``model.torchscript.pt`` (traced) only when asked for by name (``--format ...,torchscript``):
  PyTorch is retiring TorchScript.
* ``model_card.json`` and ``README.md`` - what the model is, how to feed it, how good and fast it
  is (onnxruntime latency on the exporting machine), and the search trial, KD configuration and
  teacher that produced it.

The folder is built under a temporary name beside ``--out`` and renamed into
place, so an interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd import storage
from rkd.deploy import card as cards
from rkd.deploy import writers
from rkd.deploy.files import (  # noqa: F401 - the file names, read_spec and exported_kind are part of export's API
    CARD_FILE,
    INT8_FILE,
    ONNX_FILE,
    POSTPROCESS_FILE,
    PT2_FILE,
    README_FILE,
    SPEC_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    exported_kind,
    read_spec,
)
from rkd.deploy.graphs import DetectionNetwork, LogitsNetwork, RawNetwork, output_names, raw_output_names
from rkd.errors import RkdError
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.models import Classifier
from rkd.models.detector import Detector
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows, knee, trials_path
from rkd.train.checkpoint import atomic_write_json, read_checkpoint
from rkd.metrics import metric_label
from rkd.train.tasks import TASK_OF_KIND, TASK_OF_METRIC

FORMATS = ("safetensors", "onnx", "pt2", "torchscript")
DEFAULT_FORMATS = ("safetensors", "onnx", "pt2")
EXPORT_FORMAT_VERSION = cards.EXPORT_FORMAT_VERSION

# Network input normalisation: RGB / 255, then the training collate's mean/std per channel
# (the card repeats them for users outside Python).
PIXEL_MEAN, PIXEL_STD = IMAGENET_MEAN, IMAGENET_STD
__all__ = ["RawNetwork", "LogitsNetwork", "DetectionNetwork", "output_names", "raw_output_names"]


def inference_network(model: Detector | Classifier, size: int, raw: bool = False) -> nn.Module:
    """What the ONNX / .pt2 / TorchScript files hold for ``model`` (see the module doc)."""
    if isinstance(model, Classifier):
        return LogitsNetwork(model)
    return RawNetwork(model) if raw else DetectionNetwork(model, size)


def network_output_names(network: nn.Module) -> list[str]:
    if isinstance(network, LogitsNetwork):
        return ["logits"]
    if isinstance(network, RawNetwork):
        return raw_output_names(network.detector.info)
    return output_names(network.detector.info)


_MEANING = {
    "logits": "class logits (softmax and argmax are the user's)",
    "boxes": "decoded boxes in input pixels (le90 (cx, cy, w, h, angle) or xyxy)",
    "scores": "score of each box's class: sigmoid(logit), times centerness under a square root for FCOS",
    "labels": "class index of each box (int64)",
    "batch_index": "image of the batch each kept box belongs to (int64)",
}


def output_docs(network: nn.Module, size: int, file: str) -> list[dict[str, Any]]:
    """``[{name, file, shape, meaning}]`` of ``network``'s outputs at batch 1 (``D`` for per-batch counts)."""
    thresholds = isinstance(network, DetectionNetwork) and network.nms
    with torch.no_grad():
        out = network(torch.zeros(1, 3, size, size))
    docs = []
    for name, t in zip(network_output_names(network), out if isinstance(out, tuple) else (out,)):
        shape: list[Any] = ["batch", *t.shape[1:]]
        if thresholds:
            shape = ["D", *t.shape[1:]]  # the detections kept in the whole batch
        docs.append({"name": name, "file": file, "shape": shape,
                     "meaning": _MEANING.get(name, "raw head map (see rkd.outputs for the channel layout)")})
    return docs


# --- picking a trial -------------------------------------------------------------------------


def read_run(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``RUN/trials.parquet`` and ``RUN/summary.json`` (``{}`` if absent)."""
    import pyarrow.parquet as pq

    path = trials_path(run)  # says when the folder's search is unfinished rather than absent
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # a torn or foreign file
        raise RkdError(f"{path}: cannot read the trials table ({type(exc).__name__}: {exc})") from None
    summary_path = run / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise RkdError(f"{summary_path}: not valid JSON ({exc})") from None
    return rows, summary


def _within(row: dict[str, Any], accuracy: str, min_map: float | None, max_gflops: float | None) -> bool:
    return (min_map is None or row[accuracy] >= min_map) and (max_gflops is None or row["gflops"] <= max_gflops)


def _describe(rows: list[dict[str, Any]], accuracy: str) -> str:
    return ", ".join(f"{r['trial_id']} ({_scores(r, accuracy)})" for r in rows) or "none"


def _scores(row: dict[str, Any], accuracy: str) -> str:
    return f"{metric_label(accuracy)} {row[accuracy]:.3f}, {row['gflops']:.3f} GFLOPs"


def pick_trial(
    rows: list[dict[str, Any]],
    pick: str = "best",
    min_map: float | None = None,
    max_gflops: float | None = None,
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES,
    confirmed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The trial to export: ``best`` (highest accuracy), ``knee``, or a trial id, within the constraints.

    The accuracy is the first of ``objectives`` (``map50`` for detection runs, ``top1`` for
    classification runs); ``min_map`` is the minimum of that accuracy.
    ``best`` and ``knee`` choose among the complete trials on the Pareto front;
    an explicit trial id may be any complete trial.
    ``confirmed``: the search's confirm stage (``summary.json: confirm.points``). Where one of its
    points is within the constraints, ``best`` is the one with the highest *confirmed* accuracy (the
    mean over the confirm seeds): the search's own score is its best seed's, and so optimistic.
    """
    accuracy = objectives[0]
    label = metric_label(accuracy)
    limits = " and ".join(
        [f"{label} >= {min_map}"] * (min_map is not None) + [f"GFLOPs <= {max_gflops}"] * (max_gflops is not None)
    )
    front = front_rows(rows, objectives)
    if pick in ("best", "knee"):
        ok = [r for r in front if _within(r, accuracy, min_map, max_gflops)]
        if not ok:
            raise RkdError(
                f"no complete trial on the Pareto front satisfies {limits or 'the constraints'}; "
                f"the front is: {_describe(front, accuracy)}"
            )
        if pick == "knee":
            return knee(ok, accuracy)  # type: ignore[return-value]
        by_id = {r["trial_id"]: r for r in ok}
        sure = [p for p in confirmed or [] if p["trial_id"] in by_id and p["candidate"]["mean"] is not None]
        if sure:
            return by_id[max(sure, key=lambda p: (p["candidate"]["mean"], -by_id[p["trial_id"]]["gflops"]))["trial_id"]]
        return max(ok, key=lambda r: (r[accuracy], -r["gflops"]))
    matches = [r for r in rows if r["trial_id"] == pick]
    if not matches:
        raise RkdError(f"--pick {pick!r}: no such trial; use best, knee or one of {[r['trial_id'] for r in rows]}")
    row = matches[0]
    if row["status"] != "complete" or not row.get("checkpoint"):
        raise RkdError(f"trial {pick} is {row['status']} ({row.get('reason') or 'no checkpoint'}); only complete trials export")
    if not _within(row, accuracy, min_map, max_gflops):
        raise RkdError(f"trial {pick} ({_scores(row, accuracy)}) does not satisfy {limits}")
    return row


def resolve_checkpoint(run: Path, recorded: str) -> Path:
    """The trial's ``student.pt``: the recorded path (fetched if it is a storage URI), else the same
    file under ``run`` (a moved or synced run)."""
    if storage.is_uri(recorded):
        return storage.local_copy(recorded)
    path = Path(recorded)
    if path.is_file():
        return path
    # Trial checkpoints live under RUN/ray/...; a run copied from cluster storage keeps that layout.
    parts = path.parts
    if "ray" in parts:
        moved = run.joinpath(*parts[len(parts) - 1 - parts[::-1].index("ray") :])
        if moved.is_file():
            return moved
    raise RkdError(f"{recorded}: the trial's student checkpoint is missing (looked there and under {run})")


# --- writing ---------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    trial: dict[str, Any]
    card: dict[str, Any]


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise RkdError(f"--format {text!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RkdError(f"{out}: already exists and is not an empty folder; choose another --out or remove it")


def _load_student(run: Path, row: dict[str, Any], task: Any) -> tuple[Detector | Classifier, dict[str, Any]]:
    """The trial's student (eval mode) and its checkpoint document."""
    ckpt_path = resolve_checkpoint(run, row["checkpoint"])
    ckpt = read_checkpoint(ckpt_path, task.checkpoint_kind)
    if ckpt["model_spec"].get("kind") == "openmmlab":
        raise RkdError(f"{ckpt_path}: exporting OpenMMLab students (kind openmmlab) is not supported; "
                       "use MMDeploy on the model's own checkpoint")
    if ckpt["model_spec"].get("kind") == "faster_rcnn":
        # The exported network is backbone + neck + dense head; a two-stage RoI head is not in it.
        raise RkdError(f"{ckpt_path}: exporting two-stage detectors (kind faster_rcnn) is not supported yet")
    try:
        model = task.build_model(ckpt["model_spec"], ckpt["num_classes"])
    except (RkdError, ValueError) as exc:
        raise RkdError(f"{ckpt_path}: the student's model spec does not build ({exc})") from None
    # Strict: a student checkpoint that carried adapters or other KD parts fails here.
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise RkdError(f"{ckpt_path}: weights do not fit the student's model spec: {exc}") from None
    return model.eval(), ckpt


def export_student(
    run: Path,
    out: Path,
    pick: str = "best",
    formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS,
    min_map: float | None = None,
    max_gflops: float | None = None,
    latency_runs: int = 20,
    raw: bool = False,
    int8_images: int | None = None,
) -> ExportResult:
    """Export one student of the search run ``run`` into the new folder ``out`` (see module doc).

    ``min_map`` is the minimum of the run's accuracy objective (mAP50, or top-1 for classifiers).
    ``raw``: detector graphs end at the raw head maps.
    ``int8_images``: also write ``model.int8.onnx``, calibrated on that many training images, and
    score it and ``model.onnx`` on val (:mod:`rkd.deploy.int8`).
    """
    run, out = Path(run), Path(out)
    _check_out(out)
    if int8_images is not None and (raw or "onnx" not in formats):
        raise RkdError("--int8 quantises the end-to-end model.onnx: keep onnx in --format and leave out --raw")
    rows, summary = read_run(run)
    objectives = tuple(summary.get("objectives", DEFAULT_OBJECTIVES))
    # A run's accuracy objective (the first of summary.json's objectives) says what its students are.
    task = TASK_OF_METRIC.get(objectives[0])
    if task is None:
        raise RkdError(f"{run / 'summary.json'}: unknown accuracy objective {objectives[0]!r}; "
                       f"expected one of {', '.join(TASK_OF_METRIC)}")
    row = pick_trial(rows, pick, min_map, max_gflops, objectives, (summary.get("confirm") or {}).get("points"))
    model, ckpt = _load_student(run, row, task)
    data = _int8_data(run, task) if int8_images is not None else None  # before any writing: a run without it fails fast
    size = int(ckpt["input_size"])
    network = inference_network(model, size, raw).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        spec_doc = {
            "format": EXPORT_FORMAT_VERSION,
            "kind": task.checkpoint_kind,
            "model_spec": ckpt["model_spec"],
            "num_classes": ckpt["num_classes"],
            "class_names": ckpt["class_names"],
            "input_size": size,
            "graph": "raw" if raw or isinstance(model, Classifier) else "end-to-end",
        }
        atomic_write_json(tmp / SPEC_FILE, spec_doc)
        files = {"spec": SPEC_FILE, "card": CARD_FILE, "readme": README_FILE}
        outputs: list[dict[str, Any]] = []
        if "safetensors" in formats:
            writers.write_safetensors(model, tmp / WEIGHTS_FILE)
            files["safetensors"] = WEIGHTS_FILE
        if "onnx" in formats:
            writers.write_onnx(network, size, tmp / ONNX_FILE, network_output_names(network))
            files["onnx"] = ONNX_FILE
            outputs += output_docs(network, size, ONNX_FILE)
        if "pt2" in formats:
            writers.write_pt2(network, size, tmp / PT2_FILE)
            files["pt2"] = PT2_FILE
            pt2_net = network if not (isinstance(network, DetectionNetwork) and network.nms) else \
                DetectionNetwork(model, size, nms=False).eval()
            outputs += output_docs(pt2_net, size, PT2_FILE)
        if "torchscript" in formats:
            writers.write_torchscript(network, size, tmp / TORCHSCRIPT_FILE)
            files["torchscript"] = TORCHSCRIPT_FILE
        # numpy pre/post-processing for the graphs (the README's snippet imports it); not for raw heads
        if (isinstance(model, Classifier) or not raw) and {"onnx", "pt2"} & set(formats):
            shutil.copyfile(Path(__file__).with_name(POSTPROCESS_FILE), tmp / POSTPROCESS_FILE)
            files["postprocess"] = POSTPROCESS_FILE
        latency = cards.latency_section(model, size, tmp / ONNX_FILE if "onnx" in formats else None, latency_runs)
        card = cards.model_card(model, outputs, ckpt, row, summary, run, rows, latency, files, raw)
        if data is not None:
            from rkd.deploy.int8 import int8_section

            card["metrics"]["int8"] = int8_section(tmp / ONNX_FILE, data, int(ckpt["num_classes"]), int8_images,
                                                   latency_runs, size, classifier=isinstance(model, Classifier))
            card["files"]["int8_onnx"] = INT8_FILE
            card["outputs"] += [{**o, "file": INT8_FILE} for o in outputs if o["file"] == ONNX_FILE]
        atomic_write_json(tmp / CARD_FILE, card)
        (tmp / README_FILE).write_text(cards.readme(card))
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace needs the name free or an empty folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, row, card)


def _int8_data(run: Path, task: Any) -> dict[str, Any]:
    writers.need("onnxruntime")
    from rkd.deploy.int8 import run_data

    return run_data(run, task)


# --- reading ---------------------------------------------------------------------------------


def load_exported(folder: Path) -> tuple[Detector | Classifier, dict[str, Any]]:
    """Rebuild the exported student from ``model_spec.json`` + ``model.safetensors`` (no pickles).

    Returns the model in eval mode and the spec document (:func:`read_spec`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    spec = read_spec(folder)
    if not weights_path.is_file():
        raise RkdError(f"{weights_path}: missing; is {folder} a folder written by 'rkd export --format safetensors'?")
    try:
        model = TASK_OF_KIND[spec["kind"]].build_model(spec["model_spec"], int(spec["num_classes"]))
    except (KeyError, TypeError, ValueError, RkdError) as exc:
        raise RkdError(f"{spec_path}: not an rkd model spec ({type(exc).__name__}: {exc})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise RkdError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RkdError(f"{weights_path}: weights do not fit {spec_path.name}: {exc}") from None
    return model.eval(), spec
