"""The OpenMMLab adapter with real MMRotate models (run by `make test-openmmlab`, in .venv-openmmlab).

An MMRotate 1.x rotated RetinaNet (the DOTA config shipped with MMRotate, ResNet-18, random
init) behind rkd's detector interface: its detections through the adapter equal the model's
own ``test_step`` (data preprocessor + predict + rotated NMS) on a real UCAS-AOD image; it
distils an rkd student (in process, and through ``rkd train`` with the teacher kept as it is)
and trains as a student itself.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

if importlib.util.find_spec("mmrotate") is None:  # not importorskip: mmrotate needs rkd's fixes to import
    pytest.skip("needs the OpenMMLab environment: make test-openmmlab", allow_module_level=True)

from rkd.models import build_detector  # noqa: E402
from rkd.models.openmmlab import import_openmmlab  # noqa: E402

pytestmark = pytest.mark.openmmlab
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = {  # ResNet-18 and a thin FPN/head: the same model family, small enough for a CPU test
    "model.backbone.depth": 18,
    "model.neck.in_channels": [64, 128, 256, 512],
    "model.neck.out_channels": 32,
    "model.bbox_head.in_channels": 32,
    "model.bbox_head.feat_channels": 32,
    "model.bbox_head.stacked_convs": 1,
}


def _config() -> str:
    import_openmmlab(rotated=True)
    import mmrotate

    path = Path(mmrotate.__file__).parent / ".mim" / "configs" / "rotated_retinanet"
    return str(path / "rotated-retinanet-rbox-le90_r50_fpn_1x_dota.py")


def _spec(**extra) -> dict:
    return {"kind": "openmmlab", "config": _config(), "cfg_options": dict(SMALL), **extra}


def _ucas_image(size: int = 256) -> np.ndarray:
    path = sorted((SHARED / "ucas50" / "images" / "val").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("RGB"))[:size, :size].copy()  # (H, W, 3) uint8 RGB


def _rkd_input(rgb: np.ndarray) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    return ((x - mean[:, None, None]) / std[:, None, None])[None]


def test_adapter_outputs_equal_the_models_own_predict():
    from mmdet.structures import DetDataSample

    from rkd.geometry.boxes import normalize_le90

    torch.manual_seed(0)
    det = build_detector(_spec(), 2).eval()
    info = det.info
    assert info.strides == (8, 16, 32, 64, 128) and info.num_anchors == 9 and info.box_dim == 5
    assert info.level_channels == (32,) * 5 and info.num_classes == 2
    # spread the class scores so a few hundred boxes pass the 0.05 threshold and NMS has work to do
    torch.nn.init.normal_(det.mm.bbox_head.retina_cls.weight, std=0.05)
    torch.nn.init.constant_(det.mm.bbox_head.retina_cls.bias, -1.5)

    rgb = _ucas_image()
    ours = det.predict(_rkd_input(rgb), score_threshold=0.05, nms_iou=0.1, pre_nms_top_k=2000, max_per_image=2000)[0]
    h, w = rgb.shape[:2]
    sample = DetDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)})
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1)  # what MMRotate's loader gives its preprocessor
    with torch.no_grad():
        theirs = det.mm.test_step({"inputs": [bgr], "data_samples": [sample]})[0].pred_instances

    assert len(ours["scores"]) > 20 and len(ours["scores"]) == len(theirs.scores)
    order_o, order_t = ours["scores"].argsort(descending=True), theirs.scores.argsort(descending=True)
    torch.testing.assert_close(ours["scores"][order_o], theirs.scores[order_t], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours["labels"][order_o], theirs.labels[order_t])
    theirs_boxes = normalize_le90(torch.as_tensor(getattr(theirs.bboxes, "tensor", theirs.bboxes)))
    torch.testing.assert_close(ours["boxes"][order_o], theirs_boxes[order_t], rtol=1e-4, atol=1e-3)


def _rkd_student() -> dict:
    # five levels and nine anchors per location, as the teacher, so logit and head methods line up
    return {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": 0.25, "depth": 1},
        "neck": {"channels": 16, "levels": 5},
        "head": {"convs": 1, "anchor_ratios": [0.5, 1.0, 2.0], "anchor_scales": [1.0, 1.26, 1.59]},
    }


def _batch():
    from rkd.outputs import Targets

    images = torch.cat([_rkd_input(_ucas_image()), _rkd_input(_ucas_image()[:, ::-1].copy())])
    boxes = [torch.tensor([[100.0, 120.0, 60.0, 30.0, 0.3], [180.0, 60.0, 40.0, 20.0, -0.7]])] * 2
    return images, Targets(boxes, [torch.tensor([0, 1])] * 2, (256, 256))


def test_mmrotate_teacher_distils_an_rkd_student():
    from rkd.distill import build_distiller

    torch.manual_seed(0)
    teacher = build_detector(_spec(), 2).eval().requires_grad_(False)
    student = build_detector(_rkd_student(), 2).train()
    methods = {
        "fitnet": {},
        "hinton": {"weight": 10.0},
        "ds2d2": {"hf_amplifier": False, "w_low": 1.0, "w_high": 1.0},
        "ifkd": {"prior": {"kind": "builtin"}},
    }
    distiller = build_distiller(methods, student.info, teacher.info).train()
    params = list(student.parameters()) + list(distiller.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    images, targets = _batch()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd_history = []
    for _ in range(6):
        with torch.no_grad():
            t_out = teacher(images)
        out = student(images, targets)
        terms = distiller(out, t_out, targets, epoch=1.0)
        kd = distiller.total(terms)
        opt.zero_grad()
        (sum(out.losses.values()) + kd).backward()
        opt.step()
        kd_history.append(float(kd.detach()))
        assert all(torch.isfinite(v).all() for v in terms.values())
    assert kd_history[-1] < kd_history[0]
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: never updated
    assert all(p.grad is None for p in teacher.parameters())


def test_mmrotate_model_trains_as_a_student():
    torch.manual_seed(0)
    det = build_detector(_spec(), 2).train()
    opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9)
    images, targets = _batch()
    losses = []
    for _ in range(6):
        out = det(images, targets)
        assert set(out.losses) == {"loss_cls", "loss_bbox"} and out.assignment is None
        loss = sum(out.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_rkd_train_with_an_mmrotate_teacher_kept_as_it_is(tmp_path):
    torch.manual_seed(0)
    mm = build_detector(_spec(), 2).mm
    torch.save({"state_dict": mm.state_dict()}, tmp_path / "teacher.pth")  # as MMRotate saves, weights only
    doc = {
        "name": "mmteacher",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 4, "num_val": 2, "input_size": 128, "seed": 1},
        "teacher": {"model": _spec(checkpoint="teacher.pth"), "epochs": 0, "batch_size": 2},
        "student": {"model": _rkd_student(), "epochs": 1, "batch_size": 2, "methods": {"fitnet": {}, "hinton": {}}},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run = subprocess.run(
        [sys.executable, "-m", "rkd.cli", "train", str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "[teacher] using" in out and "(loaded," in out
    # the teacher's rkd checkpoint holds the MMRotate model's weights, and loads without the .pth
    from rkd.train.checkpoint import load_detector

    teacher, ckpt = load_detector(tmp_path / "runs" / "mmteacher" / "teacher" / "teacher.pt")
    assert ckpt["model_spec"]["kind"] == "openmmlab" and ckpt["model_spec"]["checkpoint"] is None
    assert all(torch.equal(v, teacher.mm.state_dict()[k]) for k, v in mm.state_dict().items())
    assert (tmp_path / "runs" / "mmteacher" / "student" / "student.pt").is_file()
