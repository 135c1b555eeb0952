"""Scene classifier: spec, output shapes, FLOPs by hand, and fitting a few real AID images."""

from __future__ import annotations

import pytest
import torch
from aid_images import AID, load_aid

from rkd.errors import SpecError
from rkd.models import Classifier, ClassifierOutput, build_classifier, build_detector, count_flops, validate_model_spec
from rkd.models.efficientnet_lite import pretrained_checkpoint


def test_spec_defaults_and_errors():
    spec = validate_model_spec({"kind": "classifier", "backbone": {"name": "resnet18"}})
    assert spec["head"] == {"dropout": 0.0} and set(spec) == {"kind", "backbone", "head"}
    assert validate_model_spec(spec) == spec  # idempotent
    with pytest.raises(SpecError, match="neck: does not apply to kind classifier"):
        validate_model_spec({"kind": "classifier", "neck": {"channels": 8}})
    with pytest.raises(SpecError, match="head.dropout"):
        validate_model_spec({"kind": "classifier", "head": {"dropout": 1.0}})
    with pytest.raises(SpecError, match="head.convs: unknown key"):
        validate_model_spec({"kind": "classifier", "head": {"convs": 1}})
    with pytest.raises(SpecError, match="kind: classifier is not a detector"):
        build_detector({"kind": "classifier"}, num_classes=3)
    with pytest.raises(SpecError, match="build_classifier needs kind: classifier"):
        build_classifier({"kind": "retinanet"}, num_classes=3)


def test_outputs_shapes_and_loss():
    clf = build_classifier({"backbone": {"width": 0.25}, "head": {"dropout": 0.5}}, num_classes=7)
    assert isinstance(clf, Classifier)
    out = clf(torch.randn(2, 3, 64, 64), labels=torch.tensor([1, 6]))
    assert isinstance(out, ClassifierOutput)
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert torch.allclose(out.pooled, out.features[-1].mean(dim=(2, 3)))
    assert out.logits.shape == (2, 7)
    assert torch.isfinite(out.losses["cls"]) and out.losses["cls"].requires_grad
    assert clf(torch.randn(2, 3, 64, 64)).losses == {}
    probs = clf.predict(torch.randn(3, 3, 64, 64))
    assert probs.shape == (3, 7) and torch.allclose(probs.sum(1), torch.ones(3)) and clf.training


def test_flops_hand_count():
    clf = build_classifier({"backbone": {"width": 0.25}}, num_classes=3)  # convnet channels 8, 16, 32, 64, 128
    macs = (
        16 * 16 * 8 * (3 * 9)  # stem, 32 -> 16 px
        + 8 * 8 * 16 * (8 * 9)
        + 4 * 4 * 32 * (16 * 9)
        + 2 * 2 * 64 * (32 * 9)
        + 1 * 1 * 128 * (64 * 9)
        + 128 * 3  # linear (pooling and BN are not charged)
    )
    rep = count_flops(clf, 32)
    assert round(rep.gflops * 1e9) == 2 * macs
    assert rep.params == sum(p.numel() for p in clf.parameters())


def test_pretrained_efficientnet_classifier_loads_imagenet_weights():
    clf = build_classifier({"backbone": {"name": "efficientnet_lite0", "pretrained": True}}, num_classes=30)
    assert torch.equal(clf.backbone.stages[0][0][0].weight, pretrained_checkpoint(0)["_conv_stem.weight"])
    assert clf.fc.in_features == 320


@pytest.mark.skipif(not AID.is_dir(), reason="shared AID data absent")
def test_overfits_three_aid_classes():
    torch.manual_seed(0)
    images, labels = load_aid(["Beach", "Forest", "Parking"], per_class=8, split="train", size=64)
    clf = build_classifier({"backbone": {"width": 0.5}}, num_classes=3)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(60):
        loss = clf(images, labels).losses["cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    accuracy = (clf.predict(images).argmax(1) == labels).float().mean().item()
    assert accuracy == 1.0
