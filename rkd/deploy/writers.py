"""Writing an export's network to files: safetensors, ONNX, ``torch.export`` (``.pt2``), TorchScript.

The ONNX and ``.pt2`` graphs take any batch size; the image size is the spec's, fixed.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rkd import __version__
from rkd.deploy.graphs import DEFAULT_IOU, DEFAULT_SCORE, DetectionNetwork
from rkd.errors import RkdError
from rkd.models import Classifier

ONNX_OPSET = 17
# torch.export needs a range for a dynamic dimension; 2..1024 covers any batch a CPU or GPU runs.
# The example batch is 2: an example of 1 would let the exporter specialise the dimension to 1.
MAX_BATCH = 1024


def need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RkdError(f"exporting to this format needs the '{module}' package: pip install 'rkd[export]'") from None


def write_safetensors(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    kind = "classifier" if isinstance(model, Classifier) else "detector"
    save_file(state, str(path), metadata={"format": f"rkd-{kind}", "rkd_version": __version__})


def _threshold_inputs(network: nn.Module) -> bool:
    """Whether the graph takes ``score_threshold`` / ``iou_threshold`` (in-graph NMS)."""
    return isinstance(network, DetectionNetwork) and network.nms


def write_onnx(network: nn.Module, size: int, path: Path, output_names: list[str]) -> None:
    onnx = need("onnx")
    images = torch.zeros(1, 3, size, size)
    thresholds = _threshold_inputs(network)
    args = (images, torch.tensor([DEFAULT_SCORE]), torch.tensor([DEFAULT_IOU])) if thresholds else (images,)
    # With NMS in the graph, its thresholds are inputs (float32, shape (1,)), so one file serves any.
    input_names = ["images", "score_threshold", "iou_threshold"][: len(args)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            network,
            args,
            str(path),
            opset_version=ONNX_OPSET,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            # outputs: dim 0 is the batch, or the number of detections of the batch (in-graph NMS)
            dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch_or_detections"} for n in output_names}},
        )
    onnx.checker.check_model(str(path))


def write_pt2(network: nn.Module, size: int, path: Path) -> None:
    """An ``ExportedProgram`` (``torch.export.load(path).module()(images)``), dynamic batch."""
    if isinstance(network, DetectionNetwork) and network.nms:
        # torch.export has no ONNX NonMaxSuppression: the .pt2 of an HBB model stops at the candidates.
        network = DetectionNetwork(
            network.detector, network.size, network.pre_nms_top_k, network.max_per_image, nms=False
        ).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(network, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def write_torchscript(network: nn.Module, size: int, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, (torch.zeros(1, 3, size, size),))
        torch.jit.save(traced, str(path))
