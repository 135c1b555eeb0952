"""``rkd predict``: an exported student on image files, DOTA-format detections or class predictions out.

Detectors (:func:`predict_files`):

Each image is letterboxed to the model's input size as in training
(:func:`rkd.deploy.postprocess.letterbox`, numpy), detected, and its boxes are mapped back to
the file's pixels. Scenes larger
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

Scene classifiers (:func:`classify_files`): each image is resized to the input size as in
training (:func:`rkd.deploy.postprocess.resize`, antialiased bilinear, no letterbox) and
classified.

Backends: ``torch`` runs ``model.safetensors``, ``onnxruntime`` the exported ``model.onnx``
(end-to-end for detectors). Reading, resizing, tiling, NMS and writing are numpy and Pillow,
so the onnxruntime backend needs no torch, and ``auto`` picks it where torch is not installed
(or the export has no weights). Output: ``<out>/predictions.txt``, one line per image,
``image_id class probability`` (the top-1 class name and its softmax probability).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rkd.atomic import atomic_write_text
from rkd.data.images import IMAGE_SUFFIXES, find_images, read_rgb
from rkd.data.windows import window_starts
from rkd.deploy import postprocess
from rkd.deploy.files import INT8_FILE, ONNX_FILE, WEIGHTS_FILE, read_spec
from rkd.errors import DataError, RkdError

CLASS_PREDICTIONS_FILE = "predictions.txt"
CLASSIFY_BATCH = 16
BACKENDS = ("auto", "torch", "onnxruntime")

Detections = dict[str, np.ndarray]  # boxes (M, 5) le90 float32 in file pixels, scores (M,), labels (M,)
DetectFn = Callable[[np.ndarray], Detections]  # an (H, W, 3) uint8 RGB image -> its detections


def normalize(image: np.ndarray, input_cfg: dict[str, Any]) -> np.ndarray:
    """``(S, S, 3)`` RGB pixels -> the float32 ``(3, S, S)`` network input the card describes."""
    mean = np.asarray(input_cfg["mean"], np.float32)[:, None, None]
    std = np.asarray(input_cfg["std"], np.float32)[:, None, None]
    x = np.asarray(image, np.float32).transpose(2, 0, 1)
    return (x * np.float32(input_cfg.get("scale", 1 / 255)) - mean) / std


def hbb_to_le90(xyxy: np.ndarray) -> np.ndarray:
    """Axis-aligned ``(N, 4)`` xyxy -> le90 ``(N, 5)``: a tall box is the wide one turned by -pi/2."""
    x1, y1, x2, y2 = np.asarray(xyxy, np.float32).reshape(-1, 4).T
    w, h = x2 - x1, y2 - y1
    tall = h > w
    return np.stack(
        [
            (x1 + x2) / 2,
            (y1 + y2) / 2,
            np.where(tall, h, w),
            np.where(tall, w, h),
            np.where(tall, np.float32(-math.pi / 2), np.float32(0)),
        ],
        1,
    ).astype(np.float32)


def _letterboxed(infer: Callable[[np.ndarray], Detections], input_size: int, input_cfg: dict[str, Any]) -> DetectFn:
    """``image (H, W, 3) uint8 -> detections in that image's pixels`` around ``infer``, which maps one
    normalised letterboxed ``(1, 3, S, S)`` input to its detections in input pixels."""

    def detect(image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        boxed, scale = postprocess.letterbox(image, input_size)
        det = infer(normalize(boxed, input_cfg)[None])
        boxes = np.asarray(det["boxes"], np.float32)
        boxes = hbb_to_le90(boxes) if boxes.shape[-1] == 4 else boxes.copy()  # HBB models: angle-0 rectangles
        boxes[:, :4] /= np.float32(scale)
        # Drop what was found on the letterbox padding, outside the image.
        inside = (boxes[:, 0] >= 0) & (boxes[:, 0] < w) & (boxes[:, 1] >= 0) & (boxes[:, 1] < h)
        return {
            "boxes": boxes[inside],
            "scores": np.asarray(det["scores"], np.float32)[inside],
            "labels": np.asarray(det["labels"], np.int64)[inside],
        }

    return detect


def model_detector(
    model: Any, input_size: int, input_cfg: dict[str, Any], score: float, nms_iou: float = 0.1
) -> DetectFn:
    """``image (H, W, 3) uint8 -> detections in that image's pixels`` for a loaded torch detector."""
    import torch

    def infer(x: np.ndarray) -> Detections:
        with torch.no_grad():
            det = model.predict(torch.from_numpy(x), score_threshold=score, nms_iou=nms_iou)[0]
        return {key: value.numpy() for key, value in det.items()}

    return _letterboxed(infer, input_size, input_cfg)


def onnx_detector(
    session: Any, input_size: int, input_cfg: dict[str, Any], score: float, nms_iou: float = 0.1
) -> DetectFn:
    """The same as :func:`model_detector` for an end-to-end ``model.onnx`` in an onnxruntime session,
    finished by the export's numpy post-processing."""
    names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]

    def infer(x: np.ndarray) -> Detections:
        outputs = dict(zip(out_names, session.run(None, postprocess.inputs(names, x, score, nms_iou))))
        return postprocess.detections(outputs, 1, score, nms_iou)[0]

    return _letterboxed(infer, input_size, input_cfg)


def _owned(lo: int, hi: int, length: int, inner_lo: int, inner_hi: int) -> tuple[float, float]:
    return (lo if lo == 0 else lo + inner_lo / 2, hi if hi == length else hi - inner_hi / 2)


def detect_tiled(
    detect: DetectFn, image: np.ndarray, tile: int | None, overlap: int, nms_iou: float = 0.1
) -> Detections:
    """Detections of the whole ``(H, W, 3)`` image, from windows when it is larger than ``tile`` (module doc)."""
    h, w = image.shape[:2]
    if tile is None or (h <= tile and w <= tile):
        return detect(image)
    if not 0 <= overlap < tile:
        raise RkdError(f"--overlap {overlap} must be >= 0 and smaller than --tile {tile}")
    ys, xs = window_starts(h, tile, overlap), window_starts(w, tile, overlap)
    boxes, scores, labels = [], [], []
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            det = detect(image[y0:y1, x0:x1])
            b = det["boxes"].copy()
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
    merged = {"boxes": np.concatenate(boxes), "scores": np.concatenate(scores), "labels": np.concatenate(labels)}
    keep = postprocess.rotated_nms(merged["boxes"], merged["scores"], merged["labels"], nms_iou)  # by score
    return {key: value[keep] for key, value in merged.items()}


def dota_lines(det: Detections, class_names: list[str], size: tuple[int, int]) -> list[str]:
    """DOTA lines ``x1 y1 ... x4 y4 class score``, corners clipped to the ``(H, W)`` image."""
    h, w = size
    poly = postprocess.corners(det["boxes"])  # (N, 4, 2) float64
    poly[..., 0] = poly[..., 0].clip(0, w)
    poly[..., 1] = poly[..., 1].clip(0, h)
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


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _backend(exported: Path, backend: str) -> str:
    """The backend ``auto`` stands for: torch where torch is installed and the export has its weights."""
    if backend not in BACKENDS:
        raise RkdError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch" if (exported / WEIGHTS_FILE).is_file() and torch_available() else "onnxruntime"
    if backend == "torch" and not torch_available():
        raise RkdError("--backend torch needs PyTorch, which is not installed here; use --backend onnxruntime")
    return backend


def _ort_session(graph: Path) -> Any:
    try:
        from rkd.deploy.latency import ort_session
    except ImportError:
        raise RkdError("--backend onnxruntime needs the 'onnxruntime' package: pip install onnxruntime") from None
    return ort_session(graph)


def _spec_of(exported: Path, kind: str, other: str) -> dict[str, Any]:
    """The export's spec, refused unless it holds a ``kind`` (``other``: the function for the other kind)."""
    spec = read_spec(exported)
    if spec["kind"] != kind:
        raise RkdError(f"{exported}: holds a {spec['kind']}, not a {kind}; use {other}")
    return spec


def _int8_graph(exported: Path, backend: str) -> Path:
    """``model.int8.onnx`` of the export, which runs in onnxruntime only."""
    if backend == "torch":
        raise RkdError("--int8 runs model.int8.onnx in onnxruntime; leave out --backend torch")
    if not (exported / INT8_FILE).is_file():
        raise RkdError(f"{exported / INT8_FILE}: missing; write it with 'rkd export --int8'")
    return exported / INT8_FILE


def load_detector(
    exported: Path, backend: str, score: float, nms_iou: float, int8: bool = False
) -> tuple[DetectFn, dict[str, Any]]:
    """The export's detector on ``backend`` and its spec. ``auto``: torch where it is installed and the
    export has its weights (``model.safetensors``), else onnxruntime on ``model.onnx``. ``int8``:
    onnxruntime on ``model.int8.onnx`` (``rkd export --int8``)."""
    exported = Path(exported)
    spec = _spec_of(exported, "detector", "classify_files")
    graph = _int8_graph(exported, backend) if int8 else exported / ONNX_FILE
    backend = "onnxruntime" if int8 else _backend(exported, backend)
    size = int(spec["input_size"])
    if backend == "torch":
        from rkd.deploy.load import load_exported

        model, spec = load_exported(exported)
        return model_detector(model, size, spec["input"], score, nms_iou), spec
    if spec["graph"] != "end-to-end" or not (exported / ONNX_FILE).is_file():
        raise RkdError(
            f"{exported}: --backend onnxruntime needs an end-to-end {ONNX_FILE} "
            "(written by 'rkd export' with onnx in --format and without --raw)"
        )
    return onnx_detector(_ort_session(graph), size, spec["input"], score, nms_iou), spec


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
            image = read_rgb(path)
        except DataError as exc:
            skipped[path.name] = str(exc)
            log(f"{path.name}: skipped ({exc})")
            continue
        det = detect_tiled(detect, image, tile, overlap, nms_iou)
        lines = dota_lines(det, spec["class_names"], image.shape[:2])
        atomic_write_text(Path(out) / f"{image_id}.txt", "".join(f"{line}\n" for line in lines))
        counts[image_id] = len(lines)
        log(f"{path.name}: {len(lines)} detections")
    return counts, skipped


def load_classifier(
    exported: Path, backend: str = "auto", int8: bool = False
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """``(logits of a normalised (B, 3, S, S) batch, spec)`` of an exported scene classifier on ``backend``
    (``int8``: ``model.int8.onnx`` in onnxruntime)."""
    exported = Path(exported)
    spec = _spec_of(exported, "classifier", "predict_files")
    if not int8 and _backend(exported, backend) == "torch":
        import torch

        from rkd.deploy.load import load_exported

        model, spec = load_exported(exported)

        def logits(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).logits.numpy()

        return logits, spec
    graph = _int8_graph(exported, backend) if int8 else exported / ONNX_FILE
    if not graph.is_file():
        raise RkdError(f"{graph}: missing; --backend onnxruntime needs the classifier's ONNX graph")
    session = _ort_session(graph)
    return (lambda x: session.run(None, {"images": x})[0]), spec


def classify_files(
    exported: Path,
    source: Path,
    out: Path,
    log: Callable[[str], None] = print,
    backend: str = "auto",
    int8: bool = False,
) -> dict[str, tuple[str, float]]:
    """Classify ``source`` (an image or a folder) with an exported classifier; writes
    ``<out>/predictions.txt`` atomically and returns ``{image_id: (class name, probability)}``."""
    images = list_images(Path(source))
    logits_of, spec = load_classifier(Path(exported), backend, int8)
    class_names = list(spec["class_names"])
    size = int(spec["input_size"])
    ids = list(images)
    results: dict[str, tuple[str, float]] = {}
    for start in range(0, len(ids), CLASSIFY_BATCH):
        batch = ids[start : start + CLASSIFY_BATCH]
        # the training dataset's resizing: antialiased bilinear to S x S, float, clamped to [0, 255]
        x = np.stack(
            [normalize(postprocess.resize(read_rgb(images[i]), size, size).clip(0, 255), spec["input"]) for i in batch]
        )
        logits = logits_of(x).astype(np.float64)
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        for image_id, row in zip(batch, probabilities):
            label = int(row.argmax())
            results[image_id] = (class_names[label], float(row[label]))
            log(f"{images[image_id].name}: {class_names[label]} ({row[label]:.3f})")
    lines = "".join(f"{image_id} {name} {probability:.6f}\n" for image_id, (name, probability) in results.items())
    atomic_write_text(Path(out) / CLASS_PREDICTIONS_FILE, lines)
    return results
