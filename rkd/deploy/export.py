"""``rkd export``: one student of a finished search, alone, in deployable formats.

The student is a detector, or a scene classifier when the run's accuracy objective
(``summary.json``'s first objective) is ``top1``. An export folder holds (``--format``
picks the weight formats; the cards are always written):

* ``model.safetensors`` - the student's state dict (no adapters, no KD parts);
  with ``model_spec.json`` it rebuilds the :class:`~rkd.models.Detector` or
  :class:`~rkd.models.Classifier` exactly (:func:`rkd.deploy.load.load_exported`).
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

This module runs the export (:func:`export_student`); the trial and its student are picked in
:mod:`rkd.deploy.select`, the networks are :mod:`rkd.deploy.graphs`, the files are written by
:mod:`rkd.deploy.writers` and the cards made by :mod:`rkd.deploy.card`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkd.deploy import card as cards
from rkd.deploy import writers
from rkd.deploy.files import (
    CARD_FILE,
    INT8_FILE,
    ONNX_FILE,
    POSTPROCESS_FILE,
    PT2_FILE,
    README_FILE,
    SPEC_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
)
from rkd.deploy.graphs import DetectionNetwork, inference_network, network_output_names
from rkd.deploy.select import load_student, pick_trial, read_run
from rkd.errors import RkdError
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.models import Classifier
from rkd.search.results import DEFAULT_OBJECTIVES
from rkd.train.checkpoint import atomic_write_json
from rkd.train.tasks import TASK_OF_METRIC

FORMATS = ("safetensors", "onnx", "pt2", "torchscript")
DEFAULT_FORMATS = ("safetensors", "onnx", "pt2")


# Network input normalisation: RGB / 255, then the training collate's mean/std per channel
# (the card repeats them for users outside Python).
PIXEL_MEAN, PIXEL_STD = IMAGENET_MEAN, IMAGENET_STD


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
        raise RkdError(
            f"{run / 'summary.json'}: unknown accuracy objective {objectives[0]!r}; "
            f"expected one of {', '.join(TASK_OF_METRIC)}"
        )
    row = pick_trial(rows, pick, min_map, max_gflops, objectives, (summary.get("confirm") or {}).get("points"))
    model, ckpt = load_student(run, row, task)
    data = _int8_data(run, task) if int8_images is not None else None  # before any writing: a run without it fails fast
    size = int(ckpt["input_size"])
    network = inference_network(model, size, raw).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        spec_doc = {
            "format": cards.EXPORT_FORMAT_VERSION,
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
            outputs += cards.output_docs(network, size, ONNX_FILE)
        if "pt2" in formats:
            writers.write_pt2(network, size, tmp / PT2_FILE)
            files["pt2"] = PT2_FILE
            pt2_net = (
                network
                if not (isinstance(network, DetectionNetwork) and network.nms)
                else DetectionNetwork(model, size, nms=False).eval()
            )
            outputs += cards.output_docs(pt2_net, size, PT2_FILE)
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

            card["metrics"]["int8"] = int8_section(
                tmp / ONNX_FILE,
                data,
                int(ckpt["num_classes"]),
                int8_images,
                latency_runs,
                size,
                classifier=isinstance(model, Classifier),
            )
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
