"""Two-stage Faster R-CNN (horizontal boxes): spec, output layout, RoI pooling and decoding by hand, FLOPs, overfit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rkd.data.dataset import collate_detection
from rkd.data.synthetic import SyntheticAerial
from rkd.errors import SpecError
from rkd.eval import evaluate_detections
from rkd.geometry import obb_to_hbb
from rkd.models import Detector, build_detector, count_flops, validate_model_spec
from rkd.models.faster_rcnn import ROI_DELTA_SCALE, FasterRCNN, TwoStageOutput
from rkd.outputs import DetectorOutput, Targets

SMALL = {
    "kind": "faster_rcnn",
    "boxes": "hbb",
    "backbone": {"width": 0.25},
    "neck": {"channels": 32},
    "head": {"fc_channels": 128},
}


def hbb_batch(n: int = 4, size: int = 160, seed: int = 1):
    data = SyntheticAerial(n, size, num_classes=3, seed=seed)
    images, targets, _ = collate_detection([data[i] for i in range(n)])
    return images, Targets([obb_to_hbb(b) for b in targets.boxes], targets.labels, targets.image_size)


def test_spec_refuses_oriented_boxes_and_fills_defaults():
    with pytest.raises(SpecError, match="boxes: kind faster_rcnn supports only boxes: hbb; .*OpenMMLab adapter"):
        validate_model_spec({"kind": "faster_rcnn"})
    spec = validate_model_spec({"kind": "faster_rcnn", "boxes": "hbb"})
    assert spec["head"]["roi_size"] == 7 and spec["head"]["proposals_test"] == 300 and "angle_bins" not in spec["head"]
    assert validate_model_spec(spec) == spec
    with pytest.raises(SpecError, match="head.roi_size: must be >= 1"):
        validate_model_spec({"kind": "faster_rcnn", "boxes": "hbb", "head": {"roi_size": 0}})
    with pytest.raises(SpecError, match="head.angle_bins: unknown key"):
        validate_model_spec({"kind": "faster_rcnn", "boxes": "hbb", "head": {"angle_bins": 8}})


def test_output_layout_and_losses():
    torch.manual_seed(0)
    det = build_detector(SMALL, num_classes=3)
    assert isinstance(det, FasterRCNN) and isinstance(det, Detector)
    info = det.info
    assert (info.num_classes, info.num_anchors, info.box_dim, info.strides) == (1, 6, 4, (8, 16, 32))
    images, targets = hbb_batch(2, 96)
    out = det(images, targets)
    assert isinstance(out, TwoStageOutput) and isinstance(out, DetectorOutput)
    assert [tuple(c.shape) for c in out.cls_logits] == [(2, 6, 12, 12), (2, 6, 6, 6), (2, 6, 3, 3)]
    assert [tuple(b.shape) for b in out.box_regs] == [(2, 24, 12, 12), (2, 24, 6, 6), (2, 24, 3, 3)]
    assert out.flat_cls().shape == (2, 6 * (144 + 36 + 9), 1) and out.num_object_classes == 3
    r = sum(x.shape[0] for x in out.rois)
    assert all(x.shape[0] <= 128 for x in out.rois)  # roi_samples per image
    assert out.roi_cls_logits.shape == (r, 4) and out.roi_box_deltas.shape == (r, 12)
    assert out.roi_batch_index.tolist() == [i for i, x in enumerate(out.rois) for _ in range(x.shape[0])]
    assert out.roi_labels.shape == (r,) and set(out.roi_labels.tolist()) <= {0, 1, 2, 3}
    # every GT box is among the sampled RoIs' candidates, so some RoIs are foreground
    assert (out.roi_labels < 3).any()
    assert set(out.losses) == {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    asg = out.assignment
    assert (asg.pos_mask | asg.neg_mask | asg.ignore_mask).all() and (asg.matched_labels[asg.pos_mask] == 0).all()
    sum(out.losses.values()).backward()
    assert det.roi_head.fc1.weight.grad.abs().sum() > 0 and det.head.cls_out.weight.grad.abs().sum() > 0

    det.eval()
    with torch.no_grad():
        test_out = det(images)
    assert test_out.losses == {} and test_out.roi_labels is None
    for props in test_out.rois:
        assert props.shape[0] <= 300
        assert (props[:, 0] >= 0).all() and (props[:, 2] <= 96).all() and (props[:, 3] <= 96).all()
        assert (props[:, 2] > props[:, 0]).all() and (props[:, 3] > props[:, 1]).all()


def test_roi_level_mapping_by_hand():
    det = build_detector(SMALL, num_classes=3)
    head = det.roi_head
    # a constant map per level (value = level index + 1) shows which level each RoI was pooled from
    feats = [torch.full((1, 32, 64 // s, 64 // s), float(i + 1)) for i, s in enumerate((8, 16, 32))]
    # sqrt(area) 20 -> floor(4 + log2(20/224)) = 0 -> clamped to stride 8; 120 -> 3 -> stride 8;
    # 224 -> 4 -> stride 16; 500 -> 5 -> stride 32
    rois = torch.tensor([[0, 0, 20, 20], [0, 0, 120, 120], [0, 0, 224, 224], [0, 0, 500, 500.0]])
    pooled = head.pool(feats, rois, torch.zeros(4, dtype=torch.long))
    assert pooled.shape == (4, 32, 7, 7)
    assert pooled[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 3.0]


def test_detections_decode_a_planted_roi():
    det = build_detector(SMALL, num_classes=3)
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])  # RoI 1 is background
    deltas = torch.zeros(2, 12)
    deltas[0, 4:8] = torch.tensor([1.0, 0.0, 0.0, 0.0]) * torch.tensor(ROI_DELTA_SCALE) * 0.1  # class 1: dx = 0.1
    out = TwoStageOutput(
        info=det.info,
        features=[],
        cls_logits=[],
        box_regs=[],
        anchors=[],
        image_size=(100, 100),
        rois=[torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 30.0, 30.0]])],
        roi_cls_logits=logits,
        roi_box_deltas=deltas,
        roi_batch_index=torch.zeros(2, dtype=torch.long),
    )
    res = det.roi_head.detections(out, score_threshold=0.05)
    assert len(res) == 1 and res[0]["labels"].tolist() == [1]
    expected = torch.tensor(5.0).exp() / (torch.tensor(5.0).exp() + 3)  # softmax over K + 1 = 4 columns
    assert torch.allclose(res[0]["scores"], expected[None])
    # shifted right by dx * width = 0.1 * 40 px
    assert torch.allclose(res[0]["boxes"], torch.tensor([[14.0, 20.0, 54.0, 40.0]]), atol=1e-5)


class RpnOnly(nn.Module):
    def __init__(self, det: FasterRCNN) -> None:
        super().__init__()
        self.det = det

    def forward(self, x):
        return self.det.head(self.det.neck(self.det.backbone(x)))


def test_flops_count_the_roi_head_per_proposal():
    det = build_detector({**SMALL, "head": {"fc_channels": 128, "proposals_test": 1}}, num_classes=3)
    total = count_flops(det, 96).gflops * 1e9
    dense = count_flops(RpnOnly(det), 96).gflops * 1e9
    # one RoI: fc1 (32*7*7 -> 128), fc2 (128 -> 128), class (128 -> 4) and box (128 -> 12) outputs
    macs = 32 * 49 * 128 + 128 * 128 + 128 * 4 + 128 * 12
    assert round(total - dense) == 2 * macs
    assert count_flops(det, 96).params == sum(p.numel() for p in det.parameters())


def test_overfits_four_synthetic_images_hbb():
    torch.manual_seed(1)
    images, targets = hbb_batch()
    det = build_detector(SMALL, num_classes=3)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    first = None
    for _ in range(120):
        out = det(images, targets)
        first = first or {k: v.item() for k, v in out.losses.items()}
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
    assert out.losses["rpn_cls"] < 0.1 * first["rpn_cls"] and out.losses["roi_cls"] < 0.1 * first["roi_cls"]
    preds = det.predict(images)
    assert det.training
    gts = [{"boxes": b, "labels": lab} for b, lab in zip(targets.boxes, targets.labels)]
    result = evaluate_detections(preds, gts, num_classes=3, iou_threshold=0.5, oriented=False)
    assert result.map > 0.9, result.per_class
