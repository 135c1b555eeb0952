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


def test_resize_to_runs_the_backbone_at_that_size_and_counts_its_flops():
    spec = {"backbone": {"width": 0.25}}
    with pytest.raises(SpecError, match="resize_to: must be a multiple of 32 .* got 100"):
        validate_model_spec({"kind": "classifier", "resize_to": 100})
    with pytest.raises(SpecError, match="resize_to: expected an integer, got"):
        validate_model_spec({"kind": "classifier", "resize_to": "big"})
    with pytest.raises(SpecError, match="resize_to: must be >= 32, got 0"):
        validate_model_spec({"kind": "classifier", "resize_to": 0})
    assert "resize_to" not in validate_model_spec({"kind": "classifier"})  # absent: specs (and teacher keys) as before
    torch.manual_seed(0)
    plain = build_classifier(spec, num_classes=3).eval()
    resized = build_classifier({**spec, "resize_to": 64}, num_classes=3).eval()
    resized.load_state_dict(plain.state_dict())  # no weights of its own
    assert resized.info.resize_to == 64 and plain.info.resize_to is None
    x = torch.randn(2, 3, 32, 32)
    out = resized(x)
    # The backbone ran on the bilinear upsampling of x: the plain model fed that upsampling agrees.
    up = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert [tuple(f.shape[-2:]) for f in out.features] == [(8, 8), (4, 4), (2, 2)]
    assert torch.allclose(out.logits, plain(up).logits, atol=1e-6)
    # An input already at resize_to passes as it is.
    assert torch.equal(resized(up).logits, plain(up).logits)
    # FLOPs: those of the plain model at 64 px (the resize itself is not charged), 4x those at 32 px.
    assert count_flops(resized, 32).gflops == pytest.approx(count_flops(plain, 64).gflops, rel=1e-3)
    assert count_flops(resized, 32).gflops == pytest.approx(4 * count_flops(plain, 32).gflops, rel=0.02)


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
