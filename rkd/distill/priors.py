"""Frozen prior image encoders for IFKD's external disturbance enhancement (EDE).

An encoder maps the normalised input batch ``(B, 3, H, W)`` to a prior map
``(B, C_e, h, w)`` (any ``C_e``, any resolution); IFKD applies ``sigmoid`` and resizes it
to each FPN level. Encoders are built on demand by :func:`build_prior`, never at import
time, and returned frozen (``eval()``, ``requires_grad=False``):

* ``builtin``: :class:`EdgeSaliencyPrior`, a small deterministic encoder with fixed,
  analytic weights (Sobel gradient magnitude plus a centre-surround contrast, at stride 4,
  standardised per image); no download, for tests and users without SAM.
* ``module``: any ``torch.nn.Module`` the caller passes (``build_prior("module", module=m)``
  or simply ``build_prior(m)``), or, from a spec, one made by an importable callable:
  ``{kind: module, target: "package.module:Name", args: {...}}``.
* ``sam``: the image encoder of a segment-anything model (SAM ViT-B/L/H, or MobileSAM's
  ``vit_t`` with ``package="mobile_sam"``), built with
  ``sam_model_registry[model_type](checkpoint=checkpoint)`` from a checkpoint file the user
  supplies. The package is imported inside :func:`sam_prior`; nothing is downloaded.

New kinds are added with :func:`register_prior`.

In a spec the encoder is IFKD's ``prior`` option, a mapping with ``kind`` and that kind's
builder arguments; :func:`check_prior_option` validates it when the spec is loaded (unknown
kind or key, a missing checkpoint file, a target that does not import) and resolves relative
paths against the spec file's folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkd.errors import RkdError, SpecError

PRIOR_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
# Per kind: checks a spec's builder arguments (without the "kind" key) -> normalised arguments.
PRIOR_CHECKS: dict[str, Callable[[dict[str, Any], Path | None], dict[str, Any]]] = {}


def register_prior(
    name: str, check: Callable[[dict[str, Any], Path | None], dict[str, Any]] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder of prior encoders under ``name``.

    ``check(args, base_dir)`` (optional) validates the builder arguments a spec gives, raising
    :class:`~rkd.errors.SpecError` with the argument's name as path; without it any arguments pass.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in PRIOR_ENCODERS:
            raise ValueError(f"prior encoder {name!r} is registered twice")
        PRIOR_ENCODERS[name] = fn
        if check is not None:
            PRIOR_CHECKS[name] = check
        return fn

    return wrap


def check_prior_option(value: Any, base_dir: Path | None = None) -> dict[str, Any] | nn.Module:
    """Validate IFKD's ``prior`` option; return it as ``{"kind": ..., **args}`` (or the module given).

    A bare kind name stands for ``{kind: name}``. Errors are :class:`~rkd.errors.SpecError`
    with a path relative to the option.

    >>> check_prior_option("builtin")
    {'kind': 'builtin', 'stride': 4}
    >>> check_prior_option({"kind": "sam"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: checkpoint: required: the path of a segment_anything vit_b checkpoint ...
    """
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        kinds = sorted(PRIOR_ENCODERS)
        raise SpecError("", f"expected a mapping like {{kind: builtin}} (kinds: {kinds}), got {value!r}")
    args = dict(value)
    kind = args.pop("kind", "builtin")
    if kind not in PRIOR_ENCODERS:
        raise SpecError("kind", f"unknown prior encoder {kind!r}; known: {sorted(PRIOR_ENCODERS)}")
    check = PRIOR_CHECKS.get(kind)
    return {"kind": kind, **(check(args, base_dir) if check is not None else args)}


def _reject_unknown(args: Mapping[str, Any], allowed: set[str], kind: str) -> None:
    for key in args:
        if key not in allowed:
            raise SpecError(str(key), f"unknown key of a {kind!r} prior; it takes {sorted(allowed)}")


def _check_builtin(args: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    _reject_unknown(args, {"stride"}, "builtin")
    stride = args.get("stride", 4)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise SpecError("stride", f"expected an integer >= 1, got {stride!r}")
    return {"stride": stride}


def import_target(target: Any) -> Callable[..., Any]:
    """The object ``"package.module:Name"`` names (raises SpecError with path ``target``)."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise SpecError("target", f"expected 'package.module:Name', got {target!r}")
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError("target", f"cannot import {module_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError("target", f"module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError("target", f"{target!r} is not callable")
    return obj


def _check_module(args: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    if "module" in args and isinstance(args["module"], nn.Module):  # built in code, not from a spec
        return args
    _reject_unknown(args, {"target", "args"}, "module")
    if "target" not in args:
        raise SpecError("target", "required: 'package.module:Name' of a callable returning a torch.nn.Module")
    import_target(args["target"])
    call_args = args.get("args", {}) or {}
    if not isinstance(call_args, Mapping):
        raise SpecError("args", f"expected a mapping of keyword arguments, got {call_args!r}")
    return {"target": args["target"], "args": dict(call_args)}


# Model types of the known SAM packages' registries (checked without importing the package).
SAM_MODEL_TYPES = {
    "segment_anything": ("default", "vit_b", "vit_h", "vit_l"),
    "mobile_sam": ("default", "vit_b", "vit_h", "vit_l", "vit_t"),
}


def _check_sam(args: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    _reject_unknown(args, {"checkpoint", "model_type", "package"}, "sam")
    package = args.get("package", "segment_anything")
    if not isinstance(package, str) or not package:
        raise SpecError("package", f"expected a package name, got {package!r}")
    model_type = args.get("model_type", "vit_b")
    known = SAM_MODEL_TYPES.get(package)
    if not isinstance(model_type, str) or (known is not None and model_type not in known):
        raise SpecError("model_type", f"unknown {package} model type {model_type!r}; choose from {list(known or ())}")
    checkpoint = args.get("checkpoint")
    if checkpoint is None:
        raise SpecError(
            "checkpoint", f"required: the path of a {package} {model_type} checkpoint (rkd never downloads weights)"
        )
    if not isinstance(checkpoint, (str, Path)):
        raise SpecError("checkpoint", f"expected a file path, got {checkpoint!r}")
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise SpecError("checkpoint", f"file not found: {path}")
    if importlib.util.find_spec(package) is None:
        hint = "pip install segment-anything" if package == "segment_anything" else f"install the {package} package"
        raise SpecError(
            "package" if "package" in args else "kind",
            f"the 'sam' prior needs the {package!r} package, which is not installed ({hint})",
        )
    return {"checkpoint": str(path.resolve()), "model_type": model_type, "package": package}


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter frozen (returned for chaining)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_prior(kind: str | nn.Module = "builtin", **options: Any) -> nn.Module:
    """A frozen prior encoder: a registered kind with its options, or a module as it is.

    >>> enc = build_prior("builtin")
    >>> enc(torch.zeros(1, 3, 32, 48)).shape
    torch.Size([1, 1, 8, 12])
    >>> build_prior("nope")
    Traceback (most recent call last):
    ...
    ValueError: unknown prior encoder 'nope'; known: ['builtin', 'module', 'sam']
    """
    if isinstance(kind, nn.Module):
        if options:
            raise ValueError(f"a prior given as a module takes no options, got {sorted(options)}")
        return freeze(kind)
    if kind not in PRIOR_ENCODERS:
        raise ValueError(f"unknown prior encoder {kind!r}; known: {sorted(PRIOR_ENCODERS)}")
    return freeze(PRIOR_ENCODERS[kind](**options))


class EdgeSaliencyPrior(nn.Module):
    """Deterministic fixed-weight encoder: ``(B, 3, H, W) -> (B, 1, ceil(H/4), ceil(W/4))``.

    ``gray = mean(rgb)``; ``e = |Sobel(gray)| + |gray - box5(gray)|`` (gradient magnitude and
    centre-surround contrast); 4x4 average pooling; per-image standardisation (zero mean, unit
    variance), so ``sigmoid`` of it is ~0.5 on flat background and near 1 on edges and blobs.
    """

    def __init__(self, stride: int = 4) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        gray = x.mean(dim=1, keepdim=True)
        grad = torch.sqrt(_sobel_squared(F.pad(gray, (1, 1, 1, 1), mode="replicate")) + 1e-12)
        surround = F.avg_pool2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        e = grad + (gray - surround).abs()
        e = F.avg_pool2d(e, self.stride, stride=self.stride, ceil_mode=True)
        mean = e.mean(dim=(1, 2, 3), keepdim=True)
        std = e.std(dim=(1, 2, 3), keepdim=True) if e[0].numel() > 1 else torch.ones_like(mean)
        return (e - mean) / (std + 1e-6)


def _sobel_squared(padded: Tensor) -> Tensor:
    """``gx^2 + gy^2`` of the Sobel kernels ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8`` (and its
    transpose) over a 1-pixel padded ``(B, 1, H + 2, W + 2)`` map, as separable differences: a
    single-channel conv2d is ~10x slower on the CPU."""
    dx = padded[..., :, 2:] - padded[..., :, :-2]  # (H + 2, W)
    dy = padded[..., 2:, :] - padded[..., :-2, :]  # (H, W + 2)
    gx = (dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 8
    gy = (dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]) / 8
    return gx * gx + gy * gy


@register_prior("builtin", _check_builtin)
def builtin_prior(stride: int = 4) -> nn.Module:
    """The fixed :class:`EdgeSaliencyPrior`."""
    return EdgeSaliencyPrior(stride)


@register_prior("module", _check_module)
def module_prior(
    module: nn.Module | None = None, target: str | None = None, args: Mapping[str, Any] | None = None
) -> nn.Module:
    """Any torch module mapping ``(B, 3, H, W)`` to ``(B, C_e, h, w)``: given, or ``target(**args)``."""
    if target is not None and module is None:
        module = import_target(target)(**dict(args or {}))
        if not isinstance(module, nn.Module):
            raise RkdError(f"prior target {target!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if not isinstance(module, nn.Module):
        raise ValueError(f"prior 'module' needs module=<a torch.nn.Module>, got {module!r}")
    return module


class SamImageEncoder(nn.Module):
    """A SAM image encoder applied to a detector's input batch.

    SAM normalises pixels with the ImageNet mean/std (x 255), so an ImageNet-normalised
    detector input is already in its input space. The batch is resized so its long side is
    ``img_size`` (1024 for SAM), zero-padded (the mean colour) to a square at the bottom/right
    as SAM does, encoded to ``(B, 256, img_size/16, img_size/16)``, and the embedding is cropped
    back to the image's extent.
    """

    def __init__(self, encoder: nn.Module, img_size: int = 1024, patch: int = 16) -> None:
        super().__init__()
        self.encoder, self.img_size, self.patch = encoder, img_size, patch

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        scale = self.img_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, self.img_size - nw, 0, self.img_size - nh))
        emb = self.encoder(x)
        return emb[..., : math.ceil(nh / self.patch), : math.ceil(nw / self.patch)]


@register_prior("sam", _check_sam)
def sam_prior(
    checkpoint: str | Path | None = None, model_type: str = "vit_b", package: str = "segment_anything"
) -> nn.Module:
    """The image encoder of ``package.sam_model_registry[model_type](checkpoint=checkpoint)``.

    ``package`` is ``segment_anything`` (SAM: ``vit_b``, ``vit_l``, ``vit_h``) or ``mobile_sam``
    (MobileSAM, the paper's encoder: ``vit_t``). Raises :class:`~rkd.errors.RkdError` when the
    checkpoint is not given or missing, or the package is not installed.
    """
    if checkpoint is None:
        raise RkdError(
            f"the 'sam' prior needs checkpoint=<path to a {package} {model_type} checkpoint>; "
            "rkd never downloads weights"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise RkdError(f"the 'sam' prior's checkpoint {str(path)!r} does not exist or is not a file")
    try:
        mod = importlib.import_module(package)
    except ImportError:
        hint = "pip install segment-anything" if package == "segment_anything" else f"install the {package} package"
        raise RkdError(f"the 'sam' prior needs the {package!r} package, which is not installed ({hint})") from None
    registry = getattr(mod, "sam_model_registry", None)
    if registry is None:
        raise RkdError(f"package {package!r} has no sam_model_registry; is it segment-anything (or MobileSAM)?")
    if model_type not in registry:
        raise RkdError(f"unknown {package} model type {model_type!r}; choose from {sorted(registry)}")
    sam = registry[model_type](checkpoint=str(path))
    encoder = sam.image_encoder
    return SamImageEncoder(encoder, int(getattr(encoder, "img_size", 1024)))


__all__ = [
    "PRIOR_CHECKS",
    "PRIOR_ENCODERS",
    "EdgeSaliencyPrior",
    "SamImageEncoder",
    "build_prior",
    "builtin_prior",
    "check_prior_option",
    "freeze",
    "import_target",
    "module_prior",
    "register_prior",
    "sam_prior",
]
