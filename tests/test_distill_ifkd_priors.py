"""IFKD's pluggable prior encoders: builtin, module and SAM (lazy import, user checkpoint, clear errors)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rkd.distill  # noqa: F401  (importing the package must not import segment_anything)
from rkd.distill.detection.ifkd import IFKD
from rkd.distill.priors import PRIOR_ENCODERS, EdgeSaliencyPrior, build_prior, register_prior
from rkd.errors import RkdError
from rkd.outputs import DetectorInfo


def test_registry_and_no_import_time_loading() -> None:
    assert {"builtin", "module", "sam"} <= set(PRIOR_ENCODERS)
    assert "segment_anything" not in sys.modules and "mobile_sam" not in sys.modules
    with pytest.raises(ValueError, match="registered twice"):
        register_prior("builtin")(lambda: nn.Identity())


def test_builtin_prior_is_fixed_deterministic_and_responds_to_structure() -> None:
    enc = build_prior("builtin")
    assert not list(enc.parameters()) and not enc.training  # fixed weights only, frozen
    flat = torch.full((2, 3, 32, 32), 0.7)
    assert enc(flat).abs().max() < 1e-3  # nothing stands out on a flat image
    img = torch.zeros(1, 3, 32, 32)
    img[..., 12:20, 12:20] = 3.0  # a bright square
    out = enc(img)
    assert out.shape == (1, 1, 8, 8)
    assert torch.equal(out, EdgeSaliencyPrior()(img))  # deterministic, no random init
    assert out[0, 0, 2:6, 2:6].mean() > out[0, 0, :, 0].mean() + 1.0  # the square's edges score high
    assert torch.allclose(out.mean(), torch.tensor(0.0), atol=1e-5)  # standardised per image


def _edge_saliency_reference(img: np.ndarray, stride: int) -> np.ndarray:
    """The documented formula in float64, window by window: |Sobel| + |gray - box5|, pooled, standardised."""
    gray = img.mean(axis=0)
    h, w = gray.shape
    sobel = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    p1, p2 = np.pad(gray, 1, mode="edge"), np.pad(gray, 2, mode="edge")
    e = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            win = p1[i : i + 3, j : j + 3]
            gx, gy = (win * sobel).sum(), (win * sobel.T).sum()
            e[i, j] = np.sqrt(gx**2 + gy**2 + 1e-12) + abs(gray[i, j] - p2[i : i + 5, j : j + 5].mean())
    oh, ow = -(-h // stride), -(-w // stride)
    pooled = np.array(
        [[e[i * stride : (i + 1) * stride, j * stride : (j + 1) * stride].mean() for j in range(ow)] for i in range(oh)]
    )
    return (pooled - pooled.mean()) / (pooled.std(ddof=1) + 1e-6)


@pytest.mark.parametrize("stride", [4, 3])
def test_builtin_prior_matches_float64_reference(stride: int) -> None:
    img = np.random.default_rng(stride).normal(size=(3, 19, 24))
    got = EdgeSaliencyPrior(stride)(torch.from_numpy(img)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, _edge_saliency_reference(img, stride), rtol=1e-9, atol=1e-9)


def test_module_prior_is_frozen() -> None:
    m = nn.Conv2d(3, 2, 4, stride=4)
    enc = build_prior("module", module=m)
    assert enc is m and not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert build_prior(nn.Conv2d(3, 1, 1)).weight.requires_grad is False
    with pytest.raises(ValueError, match="needs module="):
        build_prior("module")
    with pytest.raises(ValueError, match="takes no options"):
        build_prior(nn.Identity(), checkpoint="x")


def test_sam_prior_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(RkdError, match="needs checkpoint=.*never downloads"):
        build_prior("sam")
    with pytest.raises(RkdError, match="does not exist"):
        build_prior("sam", checkpoint=tmp_path / "sam_vit_b.pth")
    ckpt = tmp_path / "sam_vit_b.pth"
    ckpt.write_bytes(b"not really weights")
    if importlib.util.find_spec("segment_anything") is None:
        with pytest.raises(RkdError, match="needs the 'segment_anything' package.*pip install segment-anything"):
            build_prior("sam", checkpoint=ckpt)
    if importlib.util.find_spec("mobile_sam") is None:
        with pytest.raises(RkdError, match="needs the 'mobile_sam' package"):
            build_prior("sam", checkpoint=ckpt, model_type="vit_t", package="mobile_sam")


def test_ifkd_fails_at_construction_without_a_checkpoint(tmp_path: Path) -> None:
    info = DetectorInfo(level_channels=(4, 4), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
    with pytest.raises(RkdError, match="^prior.checkpoint: required"):
        IFKD(info, info, prior="sam")
    ckpt = tmp_path / "sam_vit_b.pth"
    ckpt.write_bytes(b"x")
    if importlib.util.find_spec("segment_anything") is None:
        # the option is checked whenever it is given; the encoder is only built with EDE on
        with pytest.raises(RkdError, match="^prior.kind: the 'sam' prior needs the 'segment_anything' package"):
            IFKD(info, info, prior={"kind": "sam", "checkpoint": str(ckpt)}, ede=False)
    IFKD(info, info, prior={"kind": "module", "module": nn.Conv2d(3, 1, 1)}, ede=False)


class _TinyImageEncoder(nn.Module):
    img_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (64, 64), x.shape  # SAM's square input
        return self.proj(x)


def test_sam_prior_wiring_with_a_stand_in_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build_vit_t(checkpoint: str) -> types.SimpleNamespace:
        calls.append(checkpoint)
        return types.SimpleNamespace(image_encoder=_TinyImageEncoder())

    pkg = types.ModuleType("stand_in_sam")
    pkg.sam_model_registry = {"vit_t": build_vit_t}
    monkeypatch.setitem(sys.modules, "stand_in_sam", pkg)
    ckpt = tmp_path / "mobile_sam.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(RkdError, match="unknown stand_in_sam model type 'vit_b'.*vit_t"):
        build_prior("sam", checkpoint=ckpt, package="stand_in_sam")
    enc = build_prior("sam", checkpoint=str(ckpt), model_type="vit_t", package="stand_in_sam")
    assert calls == [str(ckpt)]
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    out = enc(torch.randn(2, 3, 40, 24))  # long side -> 64: (64, 38), padded to 64 x 64, embedding cropped
    assert out.shape == (2, 8, 4, 3)
    # the crop keeps the part of the embedding that sees the image; the padding is zeros
    x = torch.randn(1, 3, 40, 24)
    full = enc.encoder(nn.functional.pad(nn.functional.interpolate(x, size=(64, 38), mode="bilinear"), (0, 26)))
    assert torch.allclose(enc(x), full[..., :4, :3])


# ----------------------------------------------------------------------------- the prior as a spec option


def _spec_file(folder: Path, prior_yaml: str) -> Path:
    model = "{kind: retinanet, backbone: {name: convnet, width: 0.25}, neck: {channels: 16}}"
    text = (
        "name: priors\n"
        "data: {format: synthetic, num_classes: 2, input_size: 64}\n"
        f"teacher:\n  model: {model}\n"
        f"student:\n  model: {model}\n"
        "  methods:\n"
        "    ifkd:\n"
        "      alpha: 0.1\n"
        f"      prior: {prior_yaml}\n"
    )
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def test_spec_prior_default_and_builtin_are_resolved_at_load(tmp_path: Path) -> None:
    from rkd.train.spec import load_spec

    spec = load_spec(_spec_file(tmp_path, "{kind: builtin, stride: 8}"))
    assert spec.student.methods["ifkd"]["prior"] == {"kind": "builtin", "stride": 8}
    assert spec.student.methods["ifkd"]["alpha"] == 0.1
    spec = load_spec(_spec_file(tmp_path, "default"))
    assert spec.student.methods["ifkd"]["prior"] == {"kind": "builtin", "stride": 4}
    info = DetectorInfo(level_channels=(4, 4), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
    from rkd.distill import build_distiller

    comp = build_distiller({"ifkd": {"prior": {"kind": "builtin", "stride": 8}}}, info, info).components["ifkd"]
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(comp.prior_encoder()(x), EdgeSaliencyPrior(8)(x))
    assert comp.options == {"prior": {"kind": "builtin", "stride": 8}} and "prior" not in comp.hparams


def test_spec_prior_module_kind_builds_the_target(tmp_path: Path, monkeypatch) -> None:
    from rkd.distill import build_distiller, validate_methods

    monkeypatch.setenv("RKD_ALLOW_CODE", "1")  # a spec that names code runs it only when asked
    from rkd.train.spec import load_spec

    target = "{kind: module, target: 'rkd.distill.priors:EdgeSaliencyPrior', args: {stride: 2}}"
    methods = load_spec(_spec_file(tmp_path, target)).student.methods
    assert methods["ifkd"]["prior"] == {
        "kind": "module",
        "target": "rkd.distill.priors:EdgeSaliencyPrior",
        "args": {"stride": 2},
    }
    assert validate_methods(methods) == methods  # a resolved section validates to itself (workers do this)
    info = DetectorInfo(level_channels=(4, 4), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
    enc = build_distiller(methods, info, info).components["ifkd"].prior_encoder()
    assert isinstance(enc, EdgeSaliencyPrior) and enc.stride == 2 and not enc.training
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(enc(x), EdgeSaliencyPrior(2)(x))


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        (
            "{kind: sma}",
            ":10: student.methods.ifkd.prior.kind: unknown prior encoder 'sma'; known: ['builtin', 'module', 'sam']",
        ),
        (
            "{kind: builtin, strides: 2}",
            ":10: student.methods.ifkd.prior.strides: unknown key of a 'builtin' prior; it takes ['stride']",
        ),
        ("{kind: builtin, stride: 0}", ":10: student.methods.ifkd.prior.stride: expected an integer >= 1, got 0"),
        ("[builtin]", ":10: student.methods.ifkd.prior: expected a mapping like {kind: builtin}"),
        ("{kind: module}", ":10: student.methods.ifkd.prior.target: required: 'package.module:Name'"),
        (
            "{kind: module, target: 'no_such_pkg.enc:Enc'}",
            ":10: student.methods.ifkd.prior.target: cannot import 'no_such_pkg.enc'",
        ),
        (
            "{kind: module, target: 'rkd.distill.priors:Nope'}",
            ":10: student.methods.ifkd.prior.target: module 'rkd.distill.priors' has no 'Nope'",
        ),
        (
            "{kind: sam}",
            ":10: student.methods.ifkd.prior.checkpoint: required: the path of a segment_anything vit_b checkpoint (rkd never downloads weights)",
        ),
        (
            "{kind: sam, checkpoint: w.pth, model_type: vit_q}",
            ":10: student.methods.ifkd.prior.model_type: unknown segment_anything model type 'vit_q'; choose from ['default', 'vit_b', 'vit_h', 'vit_l']",
        ),
    ],
)
def test_spec_prior_errors_name_the_field(tmp_path: Path, prior: str, message: str, monkeypatch) -> None:
    from rkd.errors import SpecError
    from rkd.train.spec import load_spec

    monkeypatch.setenv("RKD_ALLOW_CODE", "1")  # past the opt-in: the target's own checks

    path = _spec_file(tmp_path, prior)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}{message}"), str(err.value)


def test_spec_sam_checkpoint_is_resolved_against_the_spec_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rkd.errors import SpecError
    from rkd.train.spec import load_spec

    path = _spec_file(tmp_path, "{kind: sam, checkpoint: weights/sam_vit_b.pth, model_type: vit_b}")
    monkeypatch.chdir(tmp_path.parent)  # relative to the spec file, not to the working directory
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == (
        f"{path}:10: student.methods.ifkd.prior.checkpoint: file not found: {tmp_path / 'weights' / 'sam_vit_b.pth'}"
    )
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "sam_vit_b.pth").write_bytes(b"x")
    if importlib.util.find_spec("segment_anything") is None:
        with pytest.raises(SpecError) as err:
            load_spec(path)
        assert str(err.value) == (
            f"{path}:10: student.methods.ifkd.prior.kind: the 'sam' prior needs the 'segment_anything' package, "
            "which is not installed (pip install segment-anything)"
        )
    else:  # installed: the checkpoint path is stored absolute; building it is left to a real checkpoint
        prior = load_spec(path).student.methods["ifkd"]["prior"]
        assert prior["checkpoint"] == str((tmp_path / "weights" / "sam_vit_b.pth").resolve())
    with pytest.raises(SpecError, match="unknown parameter; ifkd has .*'prior'"):
        from rkd.distill import validate_methods

        validate_methods({"ifkd": {"priors": {}}})


def test_a_real_sam_checkpoint_becomes_the_prior_encoder(tmp_path: Path) -> None:
    """A SAM ViT-B checkpoint file on disk (random weights: nothing is downloaded) is loaded into
    the prior, frozen; and a SAM image encoder (a small one, to keep the test fast) encodes a
    detector batch to the embedding of the image's extent."""
    segment_anything = pytest.importorskip("segment_anything")
    from segment_anything.modeling import ImageEncoderViT

    from rkd.distill.priors import SamImageEncoder

    torch.manual_seed(0)
    reference = segment_anything.sam_model_registry["vit_b"](checkpoint=None)
    ckpt = tmp_path / "sam_vit_b.pth"
    torch.save(reference.state_dict(), ckpt)
    prior = build_prior("sam", checkpoint=ckpt, model_type="vit_b")
    assert isinstance(prior, SamImageEncoder) and prior.img_size == 1024
    for (name, loaded), saved in zip(prior.encoder.state_dict().items(), reference.image_encoder.state_dict().values()):
        assert torch.equal(loaded, saved), name
    assert not any(p.requires_grad for p in prior.parameters()) and not prior.training  # frozen

    small = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=8).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        emb = SamImageEncoder(small, img_size=128)(x)
        # SAM's preprocessing written out: long side 96 -> 128, short side 64 -> 85 px, zero-padded
        # at the bottom to 128 x 128; the 8 x 8 embedding cropped to the image's 6 x 8 patches.
        resized = torch.nn.functional.interpolate(x, size=(85, 128), mode="bilinear", align_corners=False)
        expected = small(torch.nn.functional.pad(resized, (0, 0, 0, 128 - 85)))[..., :6, :8]
    assert emb.shape == (1, 8, 6, 8) and torch.allclose(emb, expected)
