"""IFKD's pluggable prior encoders: builtin, module and SAM (lazy import, user checkpoint, clear errors)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import rkd.distill  # noqa: F401  (importing the package must not import segment_anything)
from rkd.distill.ifkd import IFKD
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


def test_ifkd_fails_at_construction_without_a_checkpoint() -> None:
    info = DetectorInfo(level_channels=(4, 4), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
    with pytest.raises(RkdError, match="checkpoint"):
        IFKD(info, info, prior="sam")
    IFKD(info, info, prior="sam", ede=False)  # no encoder needed without EDE


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
