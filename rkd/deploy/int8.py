"""``rkd export --int8``: an INT8 ``model.int8.onnx`` beside ``model.onnx``, and what it costs in accuracy.

onnxruntime's static quantisation (QDQ format, per-channel int8 weights in a 7-bit range, int8 activations,
MinMax ranges) calibrated on training images of the run's data (``RUN/search_identity.json``),
preprocessed exactly as in training and ``rkd predict`` (letterboxed for detectors, resized for
scene classifiers).

Detectors: only the network is quantised - the nodes the exporter scoped under the backbone, neck
and head; the end-to-end graph's decoding, top-k and NonMaxSuppression stay float32 in the same
file. Those ops carry box coordinates in input pixels and scores compared with thresholds: 8 bits
over a 128..1024 pixel range would move boxes by pixels and scores across the threshold, and
onnxruntime has no int8 TopK or NonMaxSuppression to gain speed from. Scene classifiers: the
whole graph is the network (backbone, pooling, classifier), and all of it is quantised.

Both graphs are then scored on the val split through onnxruntime: detectors with rkd's own mAP
(:func:`rkd.eval.evaluate_detections`, the decode thresholds of training's validation and
``postprocess.py``), classifiers by val top-1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from rkd.data.dataset import build_dataset, collate_detection
from rkd.data.scene_dataset import build_scene_dataset, collate_scenes
from rkd.deploy import postprocess
from rkd.deploy.files import INT8_FILE
from rkd.deploy.graphs import DEFAULT_IOU, DEFAULT_SCORE
from rkd.deploy.latency import ort_latency, ort_session
from rkd.errors import RkdError, SpecError
from rkd.eval import evaluate_detections
from rkd.train.evaluate import merge_into_scenes, scored
from rkd.train.tasks import Task

DEFAULT_IMAGES = 32
# Scopes the ONNX exporter gives the detector's submodules: the network, not the decoding after it.
NETWORK_SCOPES = ("/backbone/", "/neck/", "/head/")
EVAL_BATCH = 8


def run_data(run: Path, task: Task) -> dict[str, Any]:
    """The validated ``data`` section the search ``run`` trained on."""
    path = Path(run) / "search_identity.json"
    try:
        data = json.loads(path.read_text())["data"]
        return task.validate_data(data)
    except FileNotFoundError:
        raise RkdError(
            f"{path}: missing; --int8 calibrates on the run's training data and reads its data section from there"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RkdError(f"{path}: no readable data section ({type(exc).__name__}: {exc})") from None
    except SpecError as exc:
        raise RkdError(f"{path}: its data section no longer validates here: {exc}") from None


def training_inputs(data: dict[str, Any], classifier: bool) -> tuple[int, Callable[[int], np.ndarray]]:
    """``(count, i -> the (1, 3, S, S) network input of training image i)``, preprocessed as for validation."""
    if classifier:
        scenes = build_scene_dataset(data, "train", train=False)
        return len(scenes), lambda i: collate_scenes([scenes[i]])[0].numpy()
    train = build_dataset(data, "train", train=False)
    return len(train), lambda i: collate_detection([train[i]])[0].numpy()


class TrainingImages(CalibrationDataReader):
    """``count`` training images spread evenly over the split, one per calibration batch."""

    def __init__(self, data: dict[str, Any], count: int, input_names: list[str], classifier: bool) -> None:
        total, network_input = training_inputs(data, classifier)
        if total == 0:
            raise RkdError("--int8: the run's training split has no images to calibrate on")
        picks = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
        self.count = len(picks)
        self._feeds = (postprocess.inputs(input_names, network_input(int(i))) for i in picks)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantise(onnx_path: Path, out: Path, data: dict[str, Any], images: int, classifier: bool) -> dict[str, Any]:
    """Write the INT8 graph of ``onnx_path`` to ``out``; returns how (for the card)."""
    if images < 1:
        raise RkdError(f"--int8-images {images}: calibrate on at least one image")
    prepared = out.with_name(out.stem + ".prep.onnx")
    try:
        # Shape inference and graph folding first, as onnxruntime advises for static quantisation.
        quant_pre_process(str(onnx_path), str(prepared))
        source, pre_processed = prepared, True
    except Exception:  # a graph its symbolic shape inference cannot follow: quantise it as exported
        source, pre_processed = onnx_path, False
    model = onnx.load(str(source))
    nodes = None if classifier else [n.name for n in model.graph.node if n.name.startswith(NETWORK_SCOPES)]
    reader = TrainingImages(data, images, [i.name for i in model.graph.input], classifier)
    try:
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: on x86 CPUs without VNNI (AVX2-only, e.g. AMD EPYC before Zen 4)
            # onnxruntime's u8 x s8 kernels add pairs of products in int16 and saturate with full
            # 8-bit weights; seen here as a detector that lost its only detection. The deployment
            # CPU is not known at export time, so the graph is made safe for all of them.
            reduce_range=True,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    quantised = (
        "the whole classifier (backbone convolutions, pooling, classifier) and its activations"
        if classifier
        else "the network (backbone, neck, head convolutions and their activations): QDQ, per-channel "
        "int8 weights (7-bit range), int8 activations; decoding, top-k and NMS stay float32"
    )
    return {
        "file": out.name,
        "quantised": quantised,
        "calibration": {
            "images": reader.count,
            "split": "train",
            "method": "MinMax",
            "preprocessing": "resize and normalise, as training and rkd predict"
            if classifier
            else "letterbox and normalise, as training and rkd predict",
        },
        "pre_processed": pre_processed,
    }


def onnx_map50(path: Path, val: Any, num_classes: int) -> tuple[float, int]:
    """``(val mAP50, images scored)`` of an end-to-end detector graph in onnxruntime on the ``val``
    dataset, scored as training's validation scores the torch model (:mod:`rkd.train.evaluate`)."""
    session = ort_session(path)
    names, out_names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    tiled = getattr(val, "windows", None) is not None  # patches are merged in scene pixels
    detections, truths, horizontal = [], [], False
    for start in range(0, len(val), EVAL_BATCH):
        images, targets, metas = collate_detection([val[i] for i in range(start, min(start + EVAL_BATCH, len(val)))])
        raw = session.run(None, postprocess.inputs(names, images.numpy(), DEFAULT_SCORE, DEFAULT_IOU))
        found = postprocess.detections(dict(zip(out_names, raw)), len(images), DEFAULT_SCORE, DEFAULT_IOU)
        for det, boxes, labels, meta in zip(found, targets.boxes, targets.labels, metas):
            det = {key: torch.from_numpy(np.array(value)) for key, value in det.items()}
            horizontal = det["boxes"].shape[-1] == 4  # the graph's box kind, the same for every image
            det, boxes = scored(det, boxes)
            if tiled:
                det["boxes"][:, :4] /= meta["scale"]
            detections.append(det)
            truths.append({"boxes": boxes, "labels": labels, "difficult": meta.get("difficult")})
    if tiled:
        detections, truths = merge_into_scenes(val, detections, horizontal)
    return float(evaluate_detections(detections, truths, num_classes=num_classes, iou_threshold=0.5).map), len(
        detections
    )


def onnx_top1(path: Path, val: Any) -> tuple[float, int]:
    """``(val top-1, images scored)`` of a classifier graph in onnxruntime on the ``val`` scenes
    (training's val preprocessing)."""
    session = ort_session(path)
    right = 0
    for start in range(0, len(val), EVAL_BATCH):
        images, labels = collate_scenes([val[i] for i in range(start, min(start + EVAL_BATCH, len(val)))])
        (logits,) = session.run(None, {"images": images.numpy()})
        right += int((logits.argmax(1) == labels.numpy()).sum())
    return right / max(1, len(val)), len(val)


def int8_section(
    onnx_path: Path,
    data: dict[str, Any],
    num_classes: int,
    images: int,
    latency_runs: int,
    size: int,
    classifier: bool = False,
) -> dict[str, Any]:
    """Quantise ``onnx_path`` into ``INT8_FILE`` beside it and measure both graphs: the card's ``int8``,
    whose accuracy sits under the task's metric key (``map50`` or ``top1``)."""
    out = onnx_path.with_name(INT8_FILE)
    section = quantise(onnx_path, out, data, images, classifier)
    if classifier:
        val = build_scene_dataset(data, "val", train=False)  # read once, scored twice
        score = lambda graph: onnx_top1(graph, val)  # noqa: E731
    else:
        val = build_dataset(data, "val", train=False)
        score = lambda graph: onnx_map50(graph, val, num_classes)  # noqa: E731
    float_score, count = score(onnx_path)
    int8_score, _ = score(out)
    section["metric"] = "top1" if classifier else "map50"
    section[section["metric"]] = {
        "float_onnx": round(float_score, 4),
        "int8_onnx": round(int8_score, 4),
        "val_images": count,
    }
    section["latency"] = {"onnxruntime_cpu_batch1": ort_latency(out, size, 1, latency_runs)}
    return section
