"""``rkd export``: one student of a finished search, alone, in deployable formats.

The student is a detector, or a scene classifier when the run's accuracy objective
(``summary.json``'s first objective) is ``top1``. An export folder holds (``--format``
picks the weight formats; the JSON files are always written):

* ``model.safetensors`` - the student's state dict (no adapters, no KD parts);
  with ``model_spec.json`` it rebuilds the :class:`~rkd.models.Detector` or
  :class:`~rkd.models.Classifier` exactly (:func:`load_exported`).
* ``model.onnx`` (opset 17) and ``model.torchscript.pt`` (traced) - the raw
  network. A detector: ``images (B, 3, S, S) -> raw head maps``, see
  :func:`output_names` for the outputs and their order; anchors, box decoding and
  NMS are not in these graphs: they stay in Python (:func:`rkd.models.postprocess.decode`).
  A classifier: ``images (B, 3, S, S) -> logits (B, K)`` (softmax and argmax are the user's).
* ``model_card.json`` - what the model is, how to feed it, how good and fast it
  is, and the search trial, KD configuration and teacher that produced it.

The folder is built under a temporary name beside ``--out`` and renamed into
place, so an interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd import __version__, storage
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.data.transforms import PAD_RGB
from rkd.errors import RkdError
from rkd.models import Classifier, count_flops, measure_latency
from rkd.models.detector import Detector
from rkd.outputs import DetectorInfo
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows, knee
from rkd.train.checkpoint import atomic_write_json, read_checkpoint
from rkd.train.tasks import TASK_OF_KIND, TASK_OF_METRIC, metric_label

FORMATS = ("safetensors", "onnx", "torchscript")
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model_spec.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
CARD_FILE = "model_card.json"
ONNX_OPSET = 17
EXPORT_FORMAT_VERSION = 1

# Network input normalisation: RGB / 255, then the training collate's mean/std per channel
# (the card repeats them for users outside Python).
PIXEL_MEAN, PIXEL_STD = IMAGENET_MEAN, IMAGENET_STD



class RawNetwork(nn.Module):
    """The detector's network alone: ``images -> (cls_0.., box_0.., [centerness_0..], [angle_0..])``.

    A flat tuple of tensors so ONNX and TorchScript tracing see plain outputs.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        d = self.detector
        head_out = d.head(d.neck(d.backbone(images)))
        extras = head_out[2] if len(head_out) > 2 else {}
        outs = list(head_out[0]) + list(head_out[1])
        for key in ("centerness", "angle_logits"):
            outs += list(extras.get(key) or [])
        return tuple(outs)


class LogitsNetwork(nn.Module):
    """The classifier's class logits alone: ``images (B, 3, S, S) -> logits (B, K)``.

    :class:`~rkd.models.Classifier` returns features and the pooled vector too (for KD);
    deployment needs only the logits, as one plain tensor for ONNX and TorchScript.
    """

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images).logits


def inference_network(model: Detector | Classifier) -> RawNetwork | LogitsNetwork:
    """What the ONNX and TorchScript files hold for ``model``."""
    return LogitsNetwork(model) if isinstance(model, Classifier) else RawNetwork(model)


def network_output_names(network: RawNetwork | LogitsNetwork) -> list[str]:
    if isinstance(network, LogitsNetwork):
        return ["logits"]
    return output_names(network.detector.info)


def output_names(info: DetectorInfo) -> list[str]:
    """Names of :class:`RawNetwork`'s outputs, in order; ``_i`` is the level, finest (stride 8) first.

    ``cls_logits_i (B, A*K, H_i, W_i)``, then ``box_regs_i (B, A*D, H_i, W_i)``
    (encoded deltas, anchor-major channels as in :mod:`rkd.outputs`), then
    ``centerness_i (B, A, H_i, W_i)`` for FCOS heads, then
    ``angle_logits_i (B, A*bins, H_i, W_i)`` when the head has an angle branch.

    >>> output_names(DetectorInfo((8, 8), (8, 16), 3, 9, 5))
    ['cls_logits_0', 'cls_logits_1', 'box_regs_0', 'box_regs_1']
    """
    levels = range(len(info.strides))
    names = [f"cls_logits_{i}" for i in levels] + [f"box_regs_{i}" for i in levels]
    if info.has_centerness:
        names += [f"centerness_{i}" for i in levels]
    if info.angle_bins:
        names += [f"angle_logits_{i}" for i in levels]
    return names


# --- picking a trial -------------------------------------------------------------------------


def read_run(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``RUN/trials.parquet`` and ``RUN/summary.json`` (``{}`` if absent)."""
    import pyarrow.parquet as pq

    path = run / "trials.parquet"
    if not path.is_file():
        raise RkdError(f"{path}: no trials table here; is {run} a search run folder (runs/<name>)?")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _teacher_identity(summary: dict[str, Any], accuracy: str) -> dict[str, Any] | None:
    teacher = summary.get("teacher")
    if not teacher:
        return None
    path = Path(teacher.get("checkpoint") or "")
    return {
        "checkpoint": teacher.get("checkpoint"),
        "sha256": _sha256(path) if path.is_file() else None,
        "config_hash": teacher.get("config_hash"),
        accuracy: teacher.get(accuracy),
        "metric": accuracy,
        "gflops": teacher.get("gflops"),
    }


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RkdError(f"{out}: already exists and is not an empty folder; choose another --out or remove it")


def export_student(
    run: Path,
    out: Path,
    pick: str = "best",
    formats: list[str] | tuple[str, ...] = FORMATS,
    min_map: float | None = None,
    max_gflops: float | None = None,
    latency_runs: int = 20,
) -> ExportResult:
    """Export one student of the search run ``run`` into the new folder ``out`` (see module doc).

    ``min_map`` is the minimum of the run's accuracy objective (mAP50, or top-1 for classifiers).
    """
    run, out = Path(run), Path(out)
    _check_out(out)
    rows, summary = read_run(run)
    objectives = tuple(summary.get("objectives", DEFAULT_OBJECTIVES))
    # A run's accuracy objective (the first of summary.json's objectives) says what its students are.
    task = TASK_OF_METRIC.get(objectives[0])
    if task is None:
        raise RkdError(f"{run / 'summary.json'}: unknown accuracy objective {objectives[0]!r}; "
                       f"expected one of {', '.join(TASK_OF_METRIC)}")
    kind = task.checkpoint_kind
    row = pick_trial(rows, pick, min_map, max_gflops, objectives, (summary.get("confirm") or {}).get("points"))
    ckpt_path = resolve_checkpoint(run, row["checkpoint"])
    ckpt = read_checkpoint(ckpt_path, kind)
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
    model.eval()
    size = int(ckpt["input_size"])
    network = inference_network(model).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        spec_doc = {
            "format": EXPORT_FORMAT_VERSION,
            "kind": kind,
            "model_spec": ckpt["model_spec"],
            "num_classes": ckpt["num_classes"],
            "class_names": ckpt["class_names"],
            "input_size": size,
        }
        atomic_write_json(tmp / SPEC_FILE, spec_doc)
        files = {"spec": SPEC_FILE, "card": CARD_FILE}
        if "safetensors" in formats:
            write_safetensors(model, tmp / WEIGHTS_FILE)
            files["safetensors"] = WEIGHTS_FILE
        if "onnx" in formats:
            write_onnx(network, size, tmp / ONNX_FILE)
            files["onnx"] = ONNX_FILE
        if "torchscript" in formats:
            write_torchscript(network, size, tmp / TORCHSCRIPT_FILE)
            files["torchscript"] = TORCHSCRIPT_FILE
        card = model_card(model, network, ckpt, row, summary, run, rows, latency_runs, files)
        atomic_write_json(tmp / CARD_FILE, card)
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace needs the name free or an empty folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, row, card)


def write_safetensors(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    kind = "classifier" if isinstance(model, Classifier) else "detector"
    save_file(state, str(path), metadata={"format": f"rkd-{kind}", "rkd_version": __version__})


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RkdError(f"exporting to this format needs the '{module}' package: pip install 'rkd[export]'") from None


def write_onnx(network: RawNetwork | LogitsNetwork, size: int, path: Path) -> None:
    onnx = _need("onnx")
    names = network_output_names(network)
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            network,
            (dummy,),
            str(path),
            opset_version=ONNX_OPSET,
            dynamo=False,
            input_names=["images"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
        )
    onnx.checker.check_model(str(path))


def write_torchscript(network: RawNetwork | LogitsNetwork, size: int, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, (torch.zeros(1, 3, size, size),))
        torch.jit.save(traced, str(path))


def model_card(
    model: Detector | Classifier,
    network: RawNetwork | LogitsNetwork,
    ckpt: dict[str, Any],
    row: dict[str, Any],
    summary: dict[str, Any],
    run: Path,
    rows: list[dict[str, Any]],
    latency_runs: int,
    files: dict[str, str],
) -> dict[str, Any]:
    size = int(ckpt["input_size"])
    flops = count_flops(model, size)
    with torch.no_grad():
        out = network(torch.zeros(1, 3, size, size))
    shapes = [list(t.shape) for t in (out if isinstance(out, tuple) else (out,))]
    kd_config = json.loads(row.get("config_json") or "{}")
    objectives = tuple(summary.get("objectives", DEFAULT_OBJECTIVES))
    accuracy = objectives[0]
    task = _task_card(model, ckpt["model_spec"], size)
    return {
        "format": EXPORT_FORMAT_VERSION,
        "rkd_version": __version__,
        "task": task["task"],
        "classes": list(ckpt["class_names"]),
        "input": task["input"],
        **({"boxes": task["boxes"]} if "boxes" in task else {}),
        "outputs": [{"name": n, "shape": s} for n, s in zip(network_output_names(network), shapes)],
        "head": task["head"],
        "metrics": {
            accuracy: row[accuracy],
            "gflops": flops.gflops,
            "params": flops.params,
            "latency_ms": _round(measure_latency(network, size, runs=latency_runs)),
            "latency": {"statistic": "median", "runs": latency_runs, "batch": 1, "device": "cpu",
                        "threads": torch.get_num_threads(), "includes": "network forward only"},
        },
        "trial": {
            "id": row["trial_id"],
            "run": str(run.resolve()),
            "on_front": row["trial_id"] in {r["trial_id"] for r in front_rows(rows, objectives)},
            "kd_methods": [m for m in (row.get("kd_methods") or "").split(",") if m],
            "params": kd_config,
            "epochs": row.get("epochs"),
        },
        "teacher": _teacher_identity(summary, accuracy),
        # the confirm stage's re-trainings of this point and of its no-KD twin, where it has them
        "confirmed": next(
            (p for p in (summary.get("confirm") or {}).get("points", []) if p["trial_id"] == row["trial_id"]), None
        ),
        "data_fingerprint": summary.get("data_fingerprint"),
        "files": files,
    }


def _input_section(size: int, resize: str) -> dict[str, Any]:
    return {
        "name": "images",
        "shape": [1, 3, size, size],
        "dtype": "float32",
        "color": "RGB",
        "scale": 1 / 255,
        "mean": list(PIXEL_MEAN),
        "std": list(PIXEL_STD),
        "resize": resize,
    }


def _task_card(model: Detector | Classifier, model_spec: dict[str, Any], size: int) -> dict[str, Any]:
    """The card's task-specific part: the task, how images become the input, how outputs are read."""
    if isinstance(model, Classifier):
        return {
            "task": "classification",
            # As rkd.data.scene_dataset.SceneDataset feeds the classifier in training and val.
            "input": _input_section(size, f"resize (not letterbox) to {size}x{size}: bilinear, antialiased, "
                                          "align_corners=False, then clamped to [0, 255]"),
            "head": {"kind": "classifier", "num_classes": model.num_classes,
                     "decode": "softmax over the logits; the predicted class is their argmax"},
        }
    info = model.info
    return {
        "task": "oriented object detection" if info.oriented else "horizontal object detection",
        "input": _input_section(
            size, f"letterbox: scale the longer side to {size}, pad bottom/right with RGB {list(PAD_RGB)}"
        ),
        "boxes": {
            "convention": "le90",
            "format": "(cx, cy, w, h, angle) in input pixels, w >= h, angle in [-pi/2, pi/2) from +x towards +y"
            if info.oriented
            else "(x1, y1, x2, y2) in input pixels",
        },
        "head": {
            "kind": model_spec.get("kind"),
            "strides": list(info.strides),
            "num_anchors": info.num_anchors,
            "box_dim": info.box_dim,
            "decode": "rkd.models.postprocess.decode (anchors, box decoding and NMS are not in the graphs)",
        },
    }


def _round(x: float) -> float:
    return round(x, 3) if math.isfinite(x) else x


# --- reading ---------------------------------------------------------------------------------


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
    if kind not in TASK_OF_KIND:
        raise RkdError(f"{spec_path}: not an rkd model spec (kind {kind!r})")
    return kind


def load_exported(folder: Path) -> tuple[Detector | Classifier, dict[str, Any]]:
    """Rebuild the exported student from ``model_spec.json`` + ``model.safetensors`` (no pickles).

    Returns the model in eval mode and the spec document (``kind``, ``class_names``,
    ``input_size``, ...), with the card's ``input`` section merged in when the card is present.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise RkdError(f"{path}: missing; is {folder} a folder written by 'rkd export --format safetensors'?")
    try:
        spec = json.loads(spec_path.read_text())
        # Exports made before classifiers could be exported carry no kind: they are detectors.
        spec.setdefault("kind", "detector")
        if spec["kind"] not in TASK_OF_KIND:
            raise ValueError(f"unknown kind {spec['kind']!r}")
        model = TASK_OF_KIND[spec["kind"]].build_model(spec["model_spec"], int(spec["num_classes"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RkdError) as exc:
        raise RkdError(f"{spec_path}: not an rkd model spec ({type(exc).__name__}: {exc})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise RkdError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RkdError(f"{weights_path}: weights do not fit {spec_path.name}: {exc}") from None
    card_path = folder / CARD_FILE
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise RkdError(f"{card_path}: not valid JSON ({exc})") from None
    spec["input"] = card.get("input", {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "scale": 1 / 255})
    return model.eval(), spec
