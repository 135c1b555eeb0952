"""Model specs: validation with defaults, and building a :class:`Detector` from one.

A model spec (the ``model`` section of a teacher or student)::

    kind: retinanet          # head family
    boxes: obb               # obb (le90 oriented) or hbb (horizontal xyxy)
    backbone: {name: convnet, width: 1.0, depth: 1, pretrained: false, out_indices: [2, 3, 4]}
    neck: {channels: 64, levels: 3}
    head: {convs: 2, anchor_ratios: [0.5, 1.0, 2.0], anchor_scales: [1.0], anchor_size: 2.0, angle_bins: 0}

``head.assign`` (retinanet, ``boxes: obb``): ``rotated`` (default) or ``hbb``, the IoU that picks
positive anchors (see :mod:`rkd.models.anchors`). A spec whose value is the default ``rotated``
is written without the key, as every spec before the option was (same teacher cache hashes).

``kind: fcos`` (anchor-free, with centerness) takes ``head: {convs, angle_bins}``.
``angle_bins > 0`` adds an angle-classification branch (oriented boxes only).
``kind: faster_rcnn`` (two-stage, ``boxes: hbb`` only) takes ``head: {convs, anchor_ratios,
anchor_scales, anchor_size, roi_size, fc_channels, proposals_train, proposals_test,
rpn_samples, roi_samples}`` (see :mod:`rkd.models.faster_rcnn`).
``kind: classifier`` (scene classification, :func:`rkd.models.classifier.build_classifier`)
has only ``backbone`` and ``head: {dropout}``; ``boxes`` and ``neck`` do not apply to it.

Backbones: ``convnet``, ``resnet18/34/50``, ``mobilenet_v2``,
``efficientnet_lite0/1/2`` (``pretrained: true``: ImageNet weights, width 1.0
only). ``out_indices`` picks backbone stages by stride ``2 ** (i + 1)``;
``weights: PATH`` loads a backbone state dict (``torch.load(weights_only=True)``).
The keys under ``backbone`` besides ``name`` and ``weights`` are the keyword
arguments of the registered backbone factory, with its defaults. Errors are
:class:`~rkd.errors.SpecError` with paths relative to the model section.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from rkd.errors import SpecError
from rkd.models import efficientnet_lite, mobilenet, resnet  # noqa: F401  (register their backbones)
from rkd.models.anchors import ASSIGN_RULES
from rkd.models.backbones import BACKBONES, PRETRAINED_WIDTHS
from rkd.models.detector import Detector
from rkd.models.faster_rcnn import build_faster_rcnn
from rkd.models.fcos import FCOSHead
from rkd.models.fpn import FPN
from rkd.models.retinanet import RetinaHead

KINDS = ("retinanet", "fcos", "faster_rcnn", "classifier", "openmmlab")
DETECTOR_KINDS = ("retinanet", "fcos", "faster_rcnn", "openmmlab")
BOX_KINDS = {"obb": 5, "hbb": 4}
NECK_DEFAULTS: dict[str, Any] = {"channels": 64, "levels": 3}
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": {
        "convs": 2,
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_scales": [1.0],
        "anchor_size": 2.0,
        "angle_bins": 0,
        "assign": "rotated",
    },
    "fcos": {"convs": 2, "angle_bins": 0},
    "faster_rcnn": {
        "convs": 1,
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_scales": [1.0, 2.0],
        "anchor_size": 2.0,
        "roi_size": 7,
        "fc_channels": 256,
        "proposals_train": 512,
        "proposals_test": 300,
        "rpn_samples": 256,
        "roi_samples": 128,
    },
    "classifier": {"dropout": 0.0},
}


def _type_name(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"expected a mapping, got {_type_name(value)}")
    return value


def _check_keys(section: dict[str, Any], allowed: list[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise SpecError(f"{prefix}{key}", f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _int(value: Any, path: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"expected an integer, got {_type_name(value)}")
    if low is not None and value < low:
        raise SpecError(path, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise SpecError(path, f"must be <= {high}, got {value}")
    return value


def _positive_float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, f"expected a number, got {_type_name(value)}")
    if not value > 0 or value == float("inf"):
        raise SpecError(path, f"must be > 0, got {value}")
    return float(value)


def _positive_floats(value: Any, path: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise SpecError(path, f"expected a non-empty list of numbers, got {_type_name(value)}")
    return [_positive_float(v, f"{path}.{i}") for i, v in enumerate(value)]


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(path, f"expected one of {', '.join(choices)}, got {_type_name(value)}")
    return value


def _backbone_params(name: str) -> dict[str, Any]:
    """Keyword arguments (with defaults) of a backbone factory: the keys a spec may set."""
    sig = inspect.signature(BACKBONES[name])
    return {p.name: p.default for p in sig.parameters.values() if p.default is not inspect.Parameter.empty}


def backbone_keys(name: str) -> set[str]:
    """The keys a ``backbone:`` section of backbone ``name`` may hold.

    >>> sorted(backbone_keys("convnet"))
    ['depth', 'name', 'out_indices', 'pretrained', 'weights', 'width']
    """
    if name not in BACKBONES:
        raise SpecError("backbone.name", f"unknown backbone {_type_name(name)}; known: {', '.join(sorted(BACKBONES))}")
    return {"name", "weights", *_backbone_params(name)}


def _backbone_value(key: str, value: Any, default: Any, path: str) -> Any:
    if key == "width":
        return _positive_float(value, path)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SpecError(path, f"expected true or false, got {_type_name(value)}")
        return value
    if isinstance(default, int):
        return _int(value, path, low=1 if key == "depth" else None)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"expected a number, got {_type_name(value)}")
        return float(value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise SpecError(path, f"expected a list of integers, got {_type_name(value)}")
        if key == "out_indices" and (not value or list(value) != sorted(set(value)) or value[0] < 0 or value[-1] > 4):
            raise SpecError(path, f"expected increasing stage indices in 0..4 (strides 2..32), got {list(value)}")
        return list(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise SpecError(path, f"expected a string, got {_type_name(value)}")
    return value


def _validate_backbone(section: Any) -> dict[str, Any]:
    section = _mapping(section, "backbone")
    name = section.get("name", "convnet")
    if name not in BACKBONES:
        raise SpecError("backbone.name", f"unknown backbone {_type_name(name)}; known: {', '.join(sorted(BACKBONES))}")
    params = _backbone_params(name)
    _check_keys(section, ["name", "weights", *params], "backbone.")
    out: dict[str, Any] = {"name": name}
    for key, default in params.items():
        value = section.get(key, default)
        if key in section:
            out[key] = _backbone_value(key, value, default, f"backbone.{key}")
        else:
            out[key] = list(default) if isinstance(default, tuple) else copy.deepcopy(default)
    weights = section.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise SpecError("backbone.weights", f"expected a file path, got {_type_name(weights)}")
    out["weights"] = weights
    if out.get("pretrained"):
        widths = PRETRAINED_WIDTHS.get(name, ())
        if not widths:
            raise SpecError("backbone.pretrained", f"backbone {name} has no pretrained weights")
        if out.get("width", 1.0) not in widths:
            raise SpecError(
                "backbone.pretrained",
                f"pretrained weights of {name} exist only for width {', '.join(map(str, widths))}, got width {out['width']}",
            )
    return out


def validate_model_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec with every default filled in, or :class:`SpecError` naming the bad entry.

    >>> validate_model_spec({"neck": {"channels": 32}})["neck"]
    {'channels': 32, 'levels': 3}
    >>> validate_model_spec({"backbone": {"width": -1}})
    Traceback (most recent call last):
    rkd.errors.SpecError: backbone.width: must be > 0, got -1
    """
    spec = _mapping(spec, "")
    kind = _choice(spec.get("kind", "retinanet"), "kind", KINDS)
    if kind == "classifier":
        return _validate_classifier_spec(spec)
    if kind == "openmmlab":
        return _validate_openmmlab_spec(spec)
    _check_keys(spec, ["kind", "boxes", "backbone", "neck", "head"], "")
    boxes = _choice(spec.get("boxes", "obb"), "boxes", tuple(BOX_KINDS))
    if kind == "faster_rcnn" and boxes != "hbb":
        raise SpecError(
            "boxes",
            "kind faster_rcnn supports only boxes: hbb; oriented two-stage detectors come via the OpenMMLab adapter",
        )

    neck_in = _mapping(spec.get("neck"), "neck")
    _check_keys(neck_in, list(NECK_DEFAULTS), "neck.")
    neck = {**NECK_DEFAULTS, **neck_in}
    neck["channels"] = _int(neck["channels"], "neck.channels", low=1)
    neck["levels"] = _int(neck["levels"], "neck.levels", low=3, high=5)

    head_defaults = HEAD_DEFAULTS[kind]
    head_in = _mapping(spec.get("head"), "head")
    _check_keys(head_in, list(head_defaults), "head.")
    head = {**copy.deepcopy(head_defaults), **head_in}
    head["convs"] = _int(head["convs"], "head.convs", low=0)
    if kind in ("retinanet", "faster_rcnn"):
        head["anchor_ratios"] = _positive_floats(head["anchor_ratios"], "head.anchor_ratios")
        head["anchor_scales"] = _positive_floats(head["anchor_scales"], "head.anchor_scales")
        head["anchor_size"] = _positive_float(head["anchor_size"], "head.anchor_size")
    if kind == "faster_rcnn":
        for key in ("roi_size", "fc_channels", "proposals_train", "proposals_test", "rpn_samples", "roi_samples"):
            head[key] = _int(head[key], f"head.{key}", low=1)
    else:
        head["angle_bins"] = _int(head["angle_bins"], "head.angle_bins", low=0)
        if head["angle_bins"] == 1:
            raise SpecError("head.angle_bins", "must be 0 (no angle classification) or >= 2, got 1")
        if head["angle_bins"] and boxes != "obb":
            raise SpecError("head.angle_bins", f"angle classification needs boxes: obb, got boxes: {boxes}")
    if kind == "retinanet":
        head["assign"] = _choice(head["assign"], "head.assign", ASSIGN_RULES)
        if head["assign"] == "hbb" and boxes != "obb":
            raise SpecError(
                "head.assign", "hbb needs boxes: obb (horizontal boxes are always assigned by their plain IoU)"
            )
        if head["assign"] == "rotated" == head_defaults["assign"]:
            # Specs without the key (older checkpoints, cached teachers) mean rotated; leaving the
            # default out keeps their validated form, and so their config hashes, unchanged.
            del head["assign"]

    backbone = _validate_backbone(spec.get("backbone"))
    outputs = len(backbone.get("out_indices", (2, 3, 4)))
    if neck["levels"] < outputs:
        raise SpecError("neck.levels", f"must be >= {outputs}, the number of backbone outputs (backbone.out_indices)")
    return {"kind": kind, "boxes": boxes, "backbone": backbone, "neck": neck, "head": head}


def _validate_openmmlab_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``{kind: openmmlab, config, checkpoint, cfg_options}`` (see :mod:`rkd.models.openmmlab`); nothing is imported."""
    _check_keys(spec, ["kind", "config", "checkpoint", "cfg_options"], "")
    config = spec.get("config")
    if not isinstance(config, str) or not config.endswith(".py"):
        raise SpecError("config", f"expected the path of an OpenMMLab config file (.py), got {config!r}")
    checkpoint = spec.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise SpecError("checkpoint", f"expected a path or null, got {checkpoint!r}")
    options = spec.get("cfg_options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise SpecError("cfg_options", f"expected a mapping of dotted config keys to values, got {options!r}")
    return {"kind": "openmmlab", "config": config, "checkpoint": checkpoint, "cfg_options": dict(options)}


def _validate_classifier_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``{kind: classifier, backbone, head: {dropout}, resize_to}`` with defaults; boxes and neck do not apply."""
    for key in spec:
        if key in ("boxes", "neck"):
            raise SpecError(key, "does not apply to kind classifier (it pools the last backbone stage)")
    _check_keys(spec, ["kind", "backbone", "head", "resize_to"], "")
    resize_to = spec.get("resize_to")
    if resize_to is not None:
        resize_to = _int(resize_to, "resize_to", low=32)
        if resize_to % 32:
            raise SpecError("resize_to", f"must be a multiple of 32 (the backbone's coarsest stride), got {resize_to}")
    head_in = _mapping(spec.get("head"), "head")
    _check_keys(head_in, list(HEAD_DEFAULTS["classifier"]), "head.")
    head = {**HEAD_DEFAULTS["classifier"], **head_in}
    dropout = head["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SpecError("head.dropout", f"expected a number in [0, 1), got {_type_name(dropout)}")
    head["dropout"] = float(dropout)
    out = {"kind": "classifier", "backbone": _validate_backbone(spec.get("backbone")), "head": head}
    return out if resize_to is None else {**out, "resize_to": resize_to}


def build_backbone(section: dict[str, Any]) -> torch.nn.Module:
    """Backbone from a validated ``backbone`` section; ``weights`` loads a user state dict into it."""
    kwargs = {k: v for k, v in section.items() if k not in ("name", "weights")}
    try:
        backbone = BACKBONES[section["name"]](**kwargs)
    except ValueError as e:
        raise SpecError("backbone", str(e)) from e
    if section.get("weights"):
        try:
            state = torch.load(section["weights"], map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways inside the unpickler
            raise SpecError("backbone.weights", f"cannot load {section['weights']}: {type(e).__name__}: {e}") from e
        try:
            backbone.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError) as e:
            raise SpecError(
                "backbone.weights", f"{section['weights']} does not fit backbone {section['name']}: {e}"
            ) from e
    return backbone


def build_detector(spec: dict[str, Any] | None, num_classes: int) -> Detector:
    """Validate ``spec`` and build the detector for ``num_classes`` object classes.

    >>> det = build_detector({"backbone": {"width": 0.25}, "neck": {"channels": 16}}, num_classes=2)
    >>> det.info.strides, det.info.num_anchors, det.info.box_dim
    ((8, 16, 32), 3, 5)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = validate_model_spec(spec)
    if spec["kind"] not in DETECTOR_KINDS:
        raise SpecError("kind", f"{spec['kind']} is not a detector; build it with rkd.models.build_classifier")
    if spec["kind"] == "openmmlab":
        from rkd.models.openmmlab import build_openmmlab_detector  # imports OpenMMLab only now

        return build_openmmlab_detector(spec, num_classes)  # type: ignore[return-value]
    backbone = build_backbone(spec["backbone"])
    neck = FPN(tuple(backbone.out_channels), spec["neck"]["channels"], spec["neck"]["levels"])
    h, channels, box_dim = spec["head"], spec["neck"]["channels"], BOX_KINDS[spec["boxes"]]
    head: torch.nn.Module
    if spec["kind"] == "faster_rcnn":
        return build_faster_rcnn(backbone, neck, h, num_classes, spec)
    if spec["kind"] == "fcos":
        head = FCOSHead(channels, num_classes, box_dim=box_dim, convs=h["convs"], angle_bins=h["angle_bins"])
    else:
        head = RetinaHead(
            channels,
            num_classes,
            box_dim=box_dim,
            convs=h["convs"],
            anchor_ratios=tuple(h["anchor_ratios"]),
            anchor_scales=tuple(h["anchor_scales"]),
            anchor_size=h["anchor_size"],
            angle_bins=h["angle_bins"],
            assign=h.get("assign", HEAD_DEFAULTS["retinanet"]["assign"]),
        )
    return Detector(backbone, neck, head, spec=spec)
