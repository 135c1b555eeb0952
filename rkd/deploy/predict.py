"""``rkd predict``: an exported student on image files, DOTA-format detections or class predictions out.

Detectors (:func:`predict_files`):

Each image is letterboxed to the model's input size exactly as in training,
detected, and its boxes are mapped back to the file's pixels. Scenes larger
than the tile size are cut into overlapping square windows of ``tile`` file
pixels (each window letterboxed to the input size on its own). A window keeps
only the detections whose centre lies in the part of it that it *owns* - its
inner edges are moved in by half the overlap, image edges stay - so an object
near a window edge is taken from the neighbouring window that sees it whole
(objects up to ``overlap / 2`` from an inner edge); the kept detections of all
windows then go through class-wise rotated NMS.

Output: ``<out>/<image_id>.txt``, one line per detection,
``x1 y1 x2 y2 x3 y3 x4 y4 class score`` (corners of the oriented box in file
pixels, clipped to the image; ``class`` is the class name).

Scene classifiers (:func:`classify_files`): each image is resized to the input size
exactly as in training (:class:`rkd.data.scene_dataset.SceneDataset`, no letterbox) and
classified. Output: ``<out>/predictions.txt``, one line per image,
``image_id class probability`` (the top-1 class name and its softmax probability).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rkd.data.images import IMAGE_SUFFIXES, find_images, read_image
from rkd.data.sample import Sample
from rkd.data.scene_dataset import SceneDataset
from rkd.data.tiling import window_starts
from rkd.data.transforms import letterbox
from rkd.deploy import postprocess
from rkd.errors import DataError, RkdError
from rkd.eval.merge import nms_merge
from rkd.geometry import obb_to_poly
from rkd.geometry.boxes import hbb_to_obb
from rkd.train.checkpoint import atomic_write_text

CLASS_PREDICTIONS_FILE = "predictions.txt"
CLASSIFY_BATCH = 16

Detections = dict[str, Tensor]  # boxes (M, 5) le90 in file pixels, scores (M,), labels (M,)
DetectFn = Callable[[Tensor], Detections]


def normalize(image: Tensor, input_cfg: dict[str, Any]) -> Tensor:
    """uint8 ``(3, H, W)`` RGB -> the float network input the card describes."""
    mean = torch.tensor(input_cfg["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(input_cfg["std"], dtype=torch.float32).view(3, 1, 1)
    return (image.float() * float(input_cfg.get("scale", 1 / 255)) - mean) / std


def _letterboxed(infer: Callable[[Tensor], Detections], input_size: int, input_cfg: dict[str, Any]) -> DetectFn:
    """``image (3, H, W) uint8 -> detections in that image's pixels`` around ``infer``, which maps one
    normalised letterboxed ``(1, 3, S, S)`` input to its detections in input pixels."""

    @torch.no_grad()
    def detect(image: Tensor) -> Detections:
        h, w = image.shape[-2:]
        empty = torch.zeros(0, 5)
        sample = Sample(image, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), "", (h, w))
        boxed, scale = letterbox(sample, input_size)
        det = infer(normalize(boxed.image, input_cfg)[None])
        boxes = det["boxes"].float()
        if boxes.shape[-1] == 4:  # a horizontal-box model: write its boxes as angle-0 rectangles
            boxes = hbb_to_obb(boxes)
        boxes = boxes.clone()
        boxes[:, :4] /= scale
        # Drop what was found on the letterbox padding, outside the image.
        inside = (boxes[:, 0] >= 0) & (boxes[:, 0] < w) & (boxes[:, 1] >= 0) & (boxes[:, 1] < h)
        return {"boxes": boxes[inside], "scores": det["scores"][inside].float(), "labels": det["labels"][inside]}

    return detect


def model_detector(
    model: torch.nn.Module, input_size: int, input_cfg: dict[str, Any], score: float, nms_iou: float = 0.1
) -> DetectFn:
    """``image (3, H, W) uint8 -> detections in that image's pixels`` for a loaded detector (torch)."""
    return _letterboxed(lambda x: model.predict(x, score_threshold=score, nms_iou=nms_iou)[0], input_size, input_cfg)


def onnx_detector(session: Any, input_size: int, input_cfg: dict[str, Any], score: float, nms_iou: float = 0.1
                  ) -> DetectFn:
    """The same as :func:`model_detector` for an end-to-end ``model.onnx`` in an onnxruntime session,
    finished by the export's numpy post-processing."""
    names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]

    def infer(x: Tensor) -> Detections:
        outputs = dict(zip(out_names, session.run(None, postprocess.inputs(names, x.numpy(), score, nms_iou))))
        det = postprocess.detections(outputs, 1, score, nms_iou)[0]
        return {key: torch.from_numpy(value) for key, value in det.items()}

    return _letterboxed(infer, input_size, input_cfg)


def _owned(lo: int, hi: int, length: int, inner_lo: int, inner_hi: int) -> tuple[float, float]:
    return (lo if lo == 0 else lo + inner_lo / 2, hi if hi == length else hi - inner_hi / 2)


def detect_tiled(detect: DetectFn, image: Tensor, tile: int | None, overlap: int, nms_iou: float = 0.1) -> Detections:
    """Detections of the whole image, from windows when it is larger than ``tile`` (see module doc)."""
    h, w = image.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return detect(image)
    if not 0 <= overlap < tile:
        raise RkdError(f"--overlap {overlap} must be >= 0 and smaller than --tile {tile}")
    ys, xs = window_starts(h, tile, overlap), window_starts(w, tile, overlap)
    boxes, scores, labels = [], [], []
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            det = detect(image[:, y0:y1, x0:x1])
            b = det["boxes"].clone()
            b[:, 0] += x0
            b[:, 1] += y0
            # The actual overlap with each neighbour (the last window may overlap more).
            left = xs[ix - 1] + tile - x0 if ix > 0 else 0
            right = x1 - xs[ix + 1] if ix + 1 < len(xs) else 0
            top = ys[iy - 1] + tile - y0 if iy > 0 else 0
            bottom = y1 - ys[iy + 1] if iy + 1 < len(ys) else 0
            ox0, ox1 = _owned(x0, x1, w, left, right)
            oy0, oy1 = _owned(y0, y1, h, top, bottom)
            keep = (b[:, 0] >= ox0) & (b[:, 0] < ox1) & (b[:, 1] >= oy0) & (b[:, 1] < oy1)
            boxes.append(b[keep])
            scores.append(det["scores"][keep])
            labels.append(det["labels"][keep])
    return nms_merge(torch.cat(boxes), torch.cat(scores), torch.cat(labels), nms_iou)


def dota_lines(det: Detections, class_names: list[str], size: tuple[int, int]) -> list[str]:
    """DOTA lines ``x1 y1 ... x4 y4 class score``, corners clipped to the ``(H, W)`` image."""
    h, w = size
    poly = obb_to_poly(det["boxes"].double()).view(-1, 4, 2)
    poly[..., 0].clamp_(0, w)
    poly[..., 1].clamp_(0, h)
    lines = []
    for corners, label, score in zip(poly.reshape(-1, 8).tolist(), det["labels"].tolist(), det["scores"].tolist()):
        coords = " ".join(f"{c:.1f}" for c in corners)
        lines.append(f"{coords} {class_names[label]} {score:.4f}")
    return lines


def list_images(source: Path) -> dict[str, Path]:
    """``{image_id: path}`` of one image file or of the images directly in a folder."""
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise RkdError(f"{source}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        return {source.stem: source}
    if not source.is_dir():
        raise RkdError(f"{source}: no such image or folder")
    images = find_images(source)
    if not images:
        raise RkdError(f"{source}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
    return images


BACKENDS = ("auto", "torch", "onnxruntime")


def load_detector(exported: Path, backend: str, score: float, nms_iou: float,
                  int8: bool = False) -> tuple[DetectFn, dict[str, Any]]:
    """The export's detector on ``backend`` and its spec. ``auto``: torch where the export has its
    weights (``model.safetensors``), else onnxruntime on ``model.onnx``. ``int8``: onnxruntime on
    ``model.int8.onnx`` (``rkd export --int8``)."""
    from rkd.deploy.export import INT8_FILE, ONNX_FILE, WEIGHTS_FILE, load_exported, read_spec

    exported = Path(exported)
    if backend not in BACKENDS:
        raise RkdError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    spec = read_spec(exported)
    if spec["kind"] != "detector":
        raise RkdError(f"{exported}: holds a {spec['kind']}, not a detector; use classify_files")
    if int8:
        if backend == "torch":
            raise RkdError("--int8 runs model.int8.onnx in onnxruntime; leave out --backend torch")
        if not (exported / INT8_FILE).is_file():
            raise RkdError(f"{exported / INT8_FILE}: missing; write it with 'rkd export --int8'")
        backend = "onnxruntime"
    if backend == "auto":
        backend = "torch" if (exported / WEIGHTS_FILE).is_file() else "onnxruntime"
    size = int(spec["input_size"])
    if backend == "torch":
        model, spec = load_exported(exported)
        return model_detector(model, size, spec["input"], score, nms_iou), spec
    if spec["graph"] != "end-to-end" or not (exported / ONNX_FILE).is_file():
        raise RkdError(f"{exported}: --backend onnxruntime needs an end-to-end {ONNX_FILE} "
                       "(written by 'rkd export' with onnx in --format and without --raw)")
    try:
        from rkd.deploy.latency import ort_session
    except ImportError:
        raise RkdError("--backend onnxruntime needs the 'onnxruntime' package: pip install onnxruntime") from None
    graph = exported / (INT8_FILE if int8 else ONNX_FILE)
    return onnx_detector(ort_session(graph), size, spec["input"], score, nms_iou), spec


def predict_files(
    exported: Path,
    source: Path,
    out: Path,
    score: float = 0.3,
    tile: int | None = None,
    overlap: int = 200,
    nms_iou: float = 0.1,
    log: Callable[[str], None] = print,
    backend: str = "auto",
    int8: bool = False,
) -> tuple[dict[str, int], dict[str, str]]:
    """Run the exported student on ``source`` (an image or a folder).

    Returns detections per image id, and the images skipped because they could not be read
    (``{file name: why}``): one bad file does not stop the others.
    """
    if tile is not None and tile < 32:
        raise RkdError(f"--tile {tile}: use at least 32 pixels")
    images = list_images(Path(source))
    detect, spec = load_detector(Path(exported), backend, score, nms_iou, int8)
    counts, skipped = {}, {}
    for image_id, path in images.items():
        try:
            image = read_image(path)
        except DataError as exc:
            skipped[path.name] = str(exc)
            log(f"{path.name}: skipped ({exc})")
            continue
        det = detect_tiled(detect, image, tile, overlap, nms_iou)
        lines = dota_lines(det, spec["class_names"], tuple(image.shape[-2:]))
        atomic_write_text(Path(out) / f"{image_id}.txt", "".join(f"{line}\n" for line in lines))
        counts[image_id] = len(lines)
        log(f"{path.name}: {len(lines)} detections")
    return counts, skipped


def classify_files(
    exported: Path, source: Path, out: Path, log: Callable[[str], None] = print
) -> dict[str, tuple[str, float]]:
    """Classify ``source`` (an image or a folder) with an exported classifier; writes
    ``<out>/predictions.txt`` atomically and returns ``{image_id: (class name, probability)}``."""
    from rkd.deploy.export import load_exported

    images = list_images(Path(source))
    model, spec = load_exported(Path(exported))
    if spec["kind"] != "classifier":
        raise RkdError(f"{exported}: holds a {spec['kind']}, not a classifier; use predict_files")
    class_names = list(spec["class_names"])
    # The training dataset's own resizing (labels unused), so deployment sees what training saw.
    scenes = SceneDataset([(path, 0) for path in images.values()], class_names, int(spec["input_size"]), train=False)
    ids = list(images)
    results: dict[str, tuple[str, float]] = {}
    with torch.no_grad():
        for start in range(0, len(ids), CLASSIFY_BATCH):
            batch = range(start, min(start + CLASSIFY_BATCH, len(ids)))
            x = torch.stack([normalize(scenes[i][0], spec["input"]) for i in batch])
            probabilities, labels = model(x).logits.softmax(dim=-1).max(dim=-1)
            for i, label, probability in zip(batch, labels.tolist(), probabilities.tolist()):
                results[ids[i]] = (class_names[label], probability)
                log(f"{images[ids[i]].name}: {class_names[label]} ({probability:.3f})")
    lines = "".join(f"{image_id} {name} {probability:.6f}\n" for image_id, (name, probability) in results.items())
    atomic_write_text(Path(out) / CLASS_PREDICTIONS_FILE, lines)
    return results
