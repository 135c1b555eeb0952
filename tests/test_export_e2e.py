"""End-to-end exported detectors: onnxruntime + postprocess.py against rkd's torch decode on real images.

Three small detectors (RetinaNet OBB, RetinaNet HBB, FCOS OBB) are trained briefly on UCAS-AOD
scenes so their scores depend on the image, exported as end-to-end ONNX graphs, and run in
onnxruntime on val scenes; the detections must be the ones ``Detector.predict`` gives (rkd's anchors,
coders and NMS): the same kept set, boxes to 1e-3 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ucas_detectors import SIZE, UCAS, same_detections, spec, trained, ucas_batches

from rkd.deploy import postprocess
from rkd.deploy.graphs import DetectionNetwork, output_names
from rkd.deploy.latency import cuda_available, ort_session
from rkd.deploy.writers import write_onnx
from rkd.models import build_detector
from rkd.outputs import Targets

pytestmark = pytest.mark.skipif(not UCAS.is_dir(), reason="../shared/data/ucas50 not present")
SCORE = 0.05


@pytest.fixture(scope="module")
def ucas() -> tuple[torch.Tensor, Targets, torch.Tensor]:
    return ucas_batches()


@pytest.mark.parametrize("kind, boxes", [("retinanet", "obb"), ("retinanet", "hbb"), ("fcos", "obb")])
def test_onnx_detections_equal_torch_decode_on_real_images(kind, boxes, ucas, tmp_path):
    model = trained(kind, boxes, ucas)
    path = tmp_path / "model.onnx"
    write_onnx(DetectionNetwork(model, SIZE).eval(), SIZE, path, output_names(model.info))
    session = ort_session(path)
    val = ucas[2]
    names = [i.name for i in session.get_inputs()]
    assert names == (["images"] if boxes == "obb" else ["images", "score_threshold", "iou_threshold"])
    for iou in (0.1, 0.5):
        # the whole val batch in one run: the batch axis is dynamic
        raw = session.run(None, postprocess.inputs(names, val.numpy(), SCORE, iou))
        got = postprocess.detections(dict(zip([o.name for o in session.get_outputs()], raw)), len(val), SCORE, iou)
        want = model.predict(val, score_threshold=SCORE, nms_iou=iou)
        assert sum(len(w["boxes"]) for w in want) > 10  # the comparison is about something
        for g, w in zip(got, want):
            same_detections(g, {k: v.numpy() for k, v in w.items()}, boxes == "obb")
            assert np.all(np.diff(g["scores"]) <= 0)  # by descending score


def test_numpy_rotated_nms_equals_rkd_and_shapely_on_real_detections(ucas):
    """postprocess.py's rotated IoU and NMS against rkd's torch ones and shapely, on a trained model's boxes."""
    from shapely.geometry import Polygon

    from rkd.geometry import batched_rotated_nms, rotated_iou

    model = trained("retinanet", "obb", ucas)
    boxes, scores, labels = DetectionNetwork(model, SIZE).eval()(ucas[2][:1])
    boxes, scores, labels = boxes[0].detach().double(), scores[0].detach(), labels[0]
    ok = scores > 0.02
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    assert len(boxes) > 50
    n = len(boxes)
    i, j = np.triu_indices(n, 1)
    mine = postprocess.rotated_iou_pairs(boxes.numpy()[i], boxes.numpy()[j])
    theirs = rotated_iou(boxes, boxes).numpy()[i, j]
    np.testing.assert_allclose(mine, theirs, atol=1e-9)
    assert (mine > 0.1).sum() > 20  # overlapping pairs are among them
    polys = [Polygon(c) for c in postprocess.corners(boxes.numpy())]
    for a, b in list(zip(i, j))[:: max(1, len(i) // 300)]:
        inter = polys[a].intersection(polys[b]).area
        expected = inter / (polys[a].area + polys[b].area - inter)
        assert abs(postprocess.rotated_iou_pairs(boxes.numpy()[a], boxes.numpy()[b])[0] - expected) < 1e-9
    for iou in (0.05, 0.1, 0.3, 0.7):
        kept = postprocess.rotated_nms(boxes.numpy(), scores.numpy(), labels.numpy(), iou)
        np.testing.assert_array_equal(kept, batched_rotated_nms(boxes, scores, labels, iou).numpy())


@pytest.mark.skipif(not cuda_available(), reason="needs a GPU and onnxruntime's CUDA provider")
def test_card_latency_on_cuda_is_measured_by_the_cuda_provider(tmp_path):
    from rkd.deploy.card import latency_section

    model = build_detector(spec("retinanet", "obb"), 2).eval()
    path = tmp_path / "model.onnx"
    write_onnx(DetectionNetwork(model, SIZE).eval(), SIZE, path, output_names(model.info))
    section = latency_section(model, SIZE, path, runs=3)
    for batch in (1, 8):
        cuda = section[f"onnxruntime_cuda_batch{batch}"]
        assert cuda["provider"] == "CUDAExecutionProvider" and cuda["batch"] == batch and cuda["median_ms"] > 0
    assert "cuda" not in section  # no "not measured" note
