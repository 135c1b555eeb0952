"""The model card of an export: ``model_card.json`` (:func:`model_card`) and ``README.md`` (:func:`readme`),
with the sections they are made of (inputs, outputs, latency).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd import __version__
from rkd.data.cache import file_digest
from rkd.data.transforms import PAD_RGB
from rkd.deploy.graphs import DetectionNetwork, network_output_names
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.metrics import metric_label
from rkd.models import Classifier, count_flops, measure_latency
from rkd.models.detector import Detector
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows

EXPORT_FORMAT_VERSION = 2  # 2: end-to-end detector graphs, model.pt2


def _teacher_identity(summary: dict[str, Any], accuracy: str) -> dict[str, Any] | None:
    teacher = summary.get("teacher")
    if not teacher:
        return None
    path = Path(teacher.get("checkpoint") or "")
    return {
        "checkpoint": teacher.get("checkpoint"),
        "sha256": file_digest(path) if path.is_file() else None,
        "config_hash": teacher.get("config_hash"),
        accuracy: teacher.get(accuracy),
        "metric": accuracy,
        "gflops": teacher.get("gflops"),
    }


def _round(x: float) -> float:
    return round(x, 3) if math.isfinite(x) else x


def input_section(size: int, resize: str) -> dict[str, Any]:
    return {
        "name": "images",
        "shape": ["batch", 3, size, size],
        "dtype": "float32",
        "color": "RGB",
        "scale": 1 / 255,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": resize,
    }


def _task_card(model: Detector | Classifier, model_spec: dict[str, Any], size: int, raw: bool) -> dict[str, Any]:
    """The card's task-specific part: the task, how images become the input, how outputs are read."""
    if isinstance(model, Classifier):
        return {
            "task": "classification",
            # As rkd.data.scene_dataset.SceneDataset feeds the classifier in training and val.
            "input": input_section(
                size,
                f"resize (not letterbox) to {size}x{size}: bilinear, antialiased, "
                "align_corners=False, then clamped to [0, 255]",
            ),
            "head": {
                "kind": "classifier",
                "num_classes": model.num_classes,
                "decode": "softmax over the logits; the predicted class is their argmax",
            },
        }
    info = model.info
    if raw:
        decode = "raw head maps: rkd.models.postprocess.decode (anchors, box decoding and NMS are not in the graphs)"
    elif info.oriented:
        decode = (
            "in the graph: per level the top-1000 (anchor, class) scores, decoded (le90); "
            "then postprocess.py: score threshold and class-wise rotated NMS"
        )
    else:
        decode = (
            "in the graph (model.onnx): per level the top-1000 (anchor, class) scores, decoded (xyxy), "
            "class-wise NonMaxSuppression; postprocess.py splits them per image "
            "(model.pt2 stops before NMS, as for oriented boxes)"
        )
    return {
        "task": "oriented object detection" if info.oriented else "horizontal object detection",
        "input": input_section(
            size,
            f"letterbox: scale the longer side to {size} (bilinear, antialiased when shrinking), "
            f"pad bottom/right with RGB {list(PAD_RGB)}",
        ),
        "boxes": {
            "convention": "le90" if info.oriented else "xyxy",
            "format": "(cx, cy, w, h, angle) in input pixels, w >= h, angle in [-pi/2, pi/2) from +x towards +y"
            if info.oriented
            else "(x1, y1, x2, y2) in input pixels",
        },
        "head": {
            "kind": model_spec.get("kind"),
            "strides": list(info.strides),
            "num_anchors": info.num_anchors,
            "box_dim": info.box_dim,
            "graph": "raw" if raw else "end-to-end",
            "decode": decode,
        },
    }


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
        docs.append(
            {
                "name": name,
                "file": file,
                "shape": shape,
                "meaning": _MEANING.get(name, "raw head map (see rkd.outputs for the channel layout)"),
            }
        )
    return docs


def latency_section(model: Detector | Classifier, size: int, onnx_path: Path | None, runs: int) -> dict[str, Any]:
    """onnxruntime latency of the exported graph at batch 1 and 8 (CPU, and CUDA where present),
    with eager PyTorch at batch 1 beside it for comparison."""
    from rkd.deploy.latency import cuda_available, ort_latency

    section: dict[str, Any] = {
        "eager_torch_cpu_batch1": {
            "median_ms": _round(measure_latency(model, size, runs=runs)),
            "batch": 1,
            "threads": torch.get_num_threads(),
            "runtime": f"torch {torch.__version__}",
            "includes": "network forward only (no decoding)",
        },
        "machine": {"cpus": os.cpu_count()},
    }
    if onnx_path is None:
        return section
    for batch in (1, 8):
        section[f"onnxruntime_cpu_batch{batch}"] = ort_latency(onnx_path, size, batch, runs)
    if cuda_available():
        for batch in (1, 8):
            section[f"onnxruntime_cuda_batch{batch}"] = ort_latency(
                onnx_path, size, batch, runs, provider="CUDAExecutionProvider"
            )
    else:
        section["cuda"] = "not measured: no GPU or no onnxruntime CUDA provider on the exporting machine"
    return section


def model_card(
    model: Detector | Classifier,
    outputs: list[dict[str, Any]],
    ckpt: dict[str, Any],
    row: dict[str, Any],
    summary: dict[str, Any],
    run: Path,
    rows: list[dict[str, Any]],
    latency: dict[str, Any],
    files: dict[str, str],
    raw: bool,
) -> dict[str, Any]:
    size = int(ckpt["input_size"])
    flops = count_flops(model, size)
    kd_config = json.loads(row.get("config_json") or "{}")
    objectives = tuple(summary.get("objectives", DEFAULT_OBJECTIVES))
    accuracy = objectives[0]
    task = _task_card(model, ckpt["model_spec"], size, raw)
    onnx_cpu = latency.get("onnxruntime_cpu_batch1")
    return {
        "format": EXPORT_FORMAT_VERSION,
        "rkd_version": __version__,
        "task": task["task"],
        "classes": list(ckpt["class_names"]),
        "input": task["input"],
        **({"boxes": task["boxes"]} if "boxes" in task else {}),
        "outputs": outputs,
        "head": task["head"],
        "metrics": {
            accuracy: row[accuracy],
            "gflops": flops.gflops,
            "params": flops.params,
            # The headline figure: the exported graph in onnxruntime on CPU at batch 1 where it was
            # written, else eager PyTorch (named in "latency").
            "latency_ms": onnx_cpu["median_ms"] if onnx_cpu else latency["eager_torch_cpu_batch1"]["median_ms"],
            "latency": latency,
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


def _latency_lines(latency: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in latency.items():
        if isinstance(value, dict) and "median_ms" in value:
            where = value.get("provider", value.get("includes", ""))
            lines.append(
                f"| {key} | {value['median_ms']:.2f} ms | {value['batch']} | {value['threads']} "
                f"| {value['runtime']} {where} |"
            )
    return lines


def _int8_rows(int8: dict[str, Any] | None) -> str:
    """The metrics table's lines for ``model.int8.onnx`` (none without ``--int8``)."""
    if not int8:
        return ""
    metric = int8.get("metric", "map50")  # cards before classifier INT8 carry mAP50 only
    scores, ms, label = int8[metric], int8["latency"]["onnxruntime_cpu_batch1"]["median_ms"], metric_label(metric)
    return (
        f"| val {label}, model.onnx in onnxruntime | {scores['float_onnx']:.3f} |\n"
        f"| val {label}, {int8['file']} (INT8: {int8['quantised']}; calibrated on "
        f"{int8['calibration']['images']} training images) | {scores['int8_onnx']:.3f} |\n"
        f"| {int8['file']} latency, onnxruntime CPU batch 1 | {ms:.2f} ms |\n"
    )


def _run_snippet(card: dict[str, Any]) -> str:
    size = card["input"]["shape"][-1]
    head = f"""```python
import numpy as np, onnxruntime as ort
from PIL import Image
from postprocess import detections, inputs, letterbox, normalize, resize  # beside model.onnx; numpy only
CLASSES = {card["classes"]!r}
image = np.asarray(Image.open("scene.png").convert("RGB"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
"""
    if card["task"] == "classification":
        return (
            head
            + f"""x = normalize(resize(image, {size}, {size}).clip(0, 255))  # training's resize: no letterbox
logits = session.run(None, {{"images": x}})[0]
print(CLASSES[int(logits[0].argmax())])
```"""
        )
    return (
        head
        + f"""canvas, scale = letterbox(image, {size})  # training's: longer side to {size}, pad bottom/right
names = [i.name for i in session.get_inputs()]
out = dict(zip([o.name for o in session.get_outputs()],
               session.run(None, inputs(names, normalize(canvas), score_threshold=0.3))))
det = detections(out, num_images=1, score_threshold=0.3)[0]
det["boxes"][:, :4] /= scale  # from input pixels to the file's
print(det["boxes"], det["scores"], [CLASSES[i] for i in det["labels"]])
```"""
    )


def readme(card: dict[str, Any]) -> str:
    """A model card for people: what it detects, input, outputs, metrics, origin, how to run it."""
    m = card["metrics"]
    accuracy = "top1" if "top1" in m else "map50"
    teacher = card.get("teacher") or {}
    trial = card["trial"]
    outputs = "\n".join(f"| `{o['name']}` | {o['file']} | {o['shape']} | {o['meaning']} |" for o in card["outputs"])
    inp = card["input"]
    return f"""# {card["task"]}: {", ".join(card["classes"])}

A student {card["head"]["kind"]} distilled by rkd {card["rkd_version"]}; it finds
{", ".join(card["classes"])} in {"aerial scenes" if accuracy == "map50" else "scene images"}.

## Input

`images`, float32 `{inp["shape"]}`, RGB: {inp["resize"]}; then `(pixel / 255 - mean) / std` with
mean {inp["mean"]} and std {inp["std"]}, channels first.
{("Boxes: " + card["boxes"]["format"] + ".") if "boxes" in card else ""}

## Outputs

| name | file | shape | meaning |
|---|---|---|---|
{outputs}

How they are read: {card["head"]["decode"]}.

## Metrics

| | |
|---|---|
| val {metric_label(accuracy)} (search) | {m[accuracy]:.3f} |
{_int8_rows(m.get("int8"))}| GFLOPs | {m["gflops"]:.3f} |
| parameters | {m["params"] / 1e6:.3f} M |

Latency (median of runs on the exporting machine, {m["latency"].get("machine", {}).get("cpus")} CPUs; a
random batch, no image reading or letterboxing):

| measured | median | batch | threads | runtime |
|---|---|---|---|---|
{chr(10).join(_latency_lines(m["latency"]))}

Time the model on your own device for the figure that counts.

## Where it comes from

- Search trial `{trial["id"]}` of `{trial["run"]}` ({"on" if trial["on_front"] else "off"} the Pareto front),
  {trial["epochs"]} epochs; KD methods: {", ".join(trial["kd_methods"]) or "none"}.
- Teacher: `{teacher.get("checkpoint")}` (val {metric_label(accuracy)} {teacher.get(accuracy)},
  sha256 `{teacher.get("sha256")}`).
- Training data: fingerprint `{card.get("data_fingerprint")}` (the search spec's `data` section).

## Run it with onnxruntime alone

{_run_snippet(card)}

`rkd predict EXPORT IMAGES` does the same with rkd's own letterbox, tiling of large scenes included.
"""
