"""MMDetection / MMRotate dense detectors as rkd detectors (``model: {kind: openmmlab, ...}``).

The adapter wraps a single-stage OpenMMLab detector (``extract_feat`` + a dense ``bbox_head``
such as ``RetinaHead`` with MMRotate's rotated anchors and coder) and returns rkd's
:class:`~rkd.outputs.DetectorOutput`, so every KD method works with it unchanged, as teacher or
as student:

* ``features``: the neck's levels; ``cls_logits`` / ``box_regs``: the head's raw maps, which
  MMDetection lays out as rkd does (``(B, A * D, H, W)``, channel ``a * D + d``);
* ``anchors``: the head's own priors (``prior_generator.grid_priors``), oriented ones in the
  le90 form rkd uses; ``box_regs`` stay in the model's coder (``bbox_coder``) encoding;
* ``losses``: the head's own losses (``bbox_head.loss``, summed over levels);
* ``head_fn``: the head, for methods that run it on other features (DS2D2's amplifiers);
* no ``assignment`` (KD methods that need one, NSD, say so).

Inputs are rkd's normalised RGB batches; they are mapped to the normalisation (and channel
order) of the model's own ``data_preprocessor`` so a model trained in MMRotate sees what it
was trained on. ``predict`` decodes with the model's coder and rkd's post-processing; a test
checks it against the model's own ``predict``.

MMRotate 1.0.0rc1 needs two fixes at import on Python 3.11 with MMDetection 3.3.0 (both
applied here without editing the installed packages): ``collections.Sequence`` (removed from
Python) and its version check, which refuses MMDetection > 3.1.0 although the parts used here
run. Nothing is imported until a model of this kind is built. Set-up: ``make openmmlab``.

Spec::

    model:
      kind: openmmlab
      config: path/to/rotated-retinanet-rbox-le90_r50_fpn_1x_dota.py   # relative to the spec
      checkpoint: path/to/model.pth      # optional: MMRotate/MMDetection weights (state_dict)
      cfg_options: {model.backbone.depth: 18}   # optional: dotted overrides of the config
"""

from __future__ import annotations

import collections
import collections.abc
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd.errors import RkdError
from rkd.geometry.boxes import normalize_le90
from rkd.inputs import IMAGENET_MEAN, IMAGENET_STD
from rkd.models.postprocess import decode
from rkd.outputs import DetectorInfo, DetectorOutput, Targets

SETUP_HINT = (
    "kind openmmlab needs mmengine, mmcv 2.1 (with its compiled ops), mmdet 3.3 and, for rotated models, "
    "mmrotate 1.0.0rc1: run `make openmmlab` (it builds mmcv once and installs them in .venv-openmmlab)"
)


def import_openmmlab(rotated: bool = True) -> Any:
    """Import MMDetection (and MMRotate), register their modules and return the model registry."""
    if not hasattr(collections, "Sequence"):  # MMRotate 1.0.0rc1 imports it from collections
        collections.Sequence = collections.abc.Sequence  # type: ignore[attr-defined]
    try:
        import mmdet
        import mmengine  # noqa: F401
    except ImportError as exc:
        raise RkdError(f"{SETUP_HINT} ({exc})") from None
    if not rotated:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        return MODELS
    real = mmdet.__version__
    mmdet.__version__ = "3.1.0"  # MMRotate 1.0.0rc1 asserts mmdet <= 3.1.0; the parts rkd uses run on 3.3
    try:
        import mmrotate  # noqa: F401
    except ImportError as exc:
        raise RkdError(f"{SETUP_HINT} ({exc})") from None
    finally:
        mmdet.__version__ = real
    from mmrotate.registry import MODELS
    from mmrotate.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return MODELS


def _is_rotated(cfg: Any) -> bool:
    return "rotated" in str(cfg.get("default_scope", "")).lower() or "Rotated" in str(cfg.model)


def load_config(spec: dict[str, Any], num_classes: int) -> Any:
    """The MMEngine config of ``spec`` with its overrides and ``num_classes`` applied."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(spec["config"])
    except Exception as exc:
        raise RkdError(f"{spec['config']}: cannot read the OpenMMLab config ({type(exc).__name__}: {exc})") from None
    if spec.get("cfg_options"):
        cfg.merge_from_dict(dict(spec["cfg_options"]))
    head = cfg.model.get("bbox_head")
    if head is None or "roi_head" in cfg.model:
        raise RkdError(f"{spec['config']}: only single-stage dense detectors (a bbox_head, no roi_head) are adapted")
    head.num_classes = num_classes
    # Nothing is downloaded at run time: a pretrained-backbone init_cfg would fetch weights. The
    # checkpoint has every weight; without one the model starts from the config's random init.
    cfg.model.backbone.init_cfg = None
    return cfg


class OpenMMLabDetector(nn.Module):
    """An OpenMMLab single-stage detector behind rkd's detector interface (see the module doc)."""

    def __init__(self, mm_model: nn.Module, spec: dict[str, Any], rotated: bool, preprocessor: dict[str, Any]):
        super().__init__()
        self.mm = mm_model
        self.spec = spec
        self.rotated = rotated
        head = mm_model.bbox_head
        if not getattr(head, "use_sigmoid_cls", False):
            raise RkdError(f"{spec['config']}: the head must score classes with sigmoids (rkd has no background class)")
        strides = tuple(int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in head.prior_generator.strides)
        box_dim = int(getattr(head.bbox_coder, "encode_size", 4))
        channels = int(getattr(mm_model.neck, "out_channels", head.in_channels))
        self._info = DetectorInfo(
            level_channels=(channels,) * len(strides),
            strides=strides,
            num_classes=int(head.num_classes),
            num_anchors=int(head.num_base_priors),
            box_dim=box_dim,
        )
        # rkd input (RGB, (x - MEAN) / STD on 0-1) -> the model's (its channel order, on 0-255)
        mean = torch.tensor(preprocessor.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)
        std = torch.tensor(preprocessor.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)
        order = (
            [0, 1, 2] if preprocessor.get("bgr_to_rgb", False) or preprocessor.get("rgb_to_bgr", False) else [2, 1, 0]
        )
        # bgr_to_rgb: images are read BGR and turned RGB, so the network sees RGB; without it, BGR.
        scale = torch.tensor(IMAGENET_STD)[order] * 255.0 / std
        shift = (torch.tensor(IMAGENET_MEAN)[order] * 255.0 - mean) / std
        self.register_buffer("in_order", torch.tensor(order), persistent=False)
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)

    @property
    def info(self) -> DetectorInfo:
        return self._info

    def to_model_input(self, images: Tensor) -> Tensor:
        """An rkd-normalised RGB batch as the model's data preprocessor would have made it."""
        return images[:, self.in_order] * self.in_scale.to(images.dtype) + self.in_shift.to(images.dtype)

    def anchors(self, features: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in features]
        priors = self.mm.bbox_head.prior_generator.grid_priors(sizes, device=features[0].device)
        return [getattr(p, "tensor", p) for p in priors]

    def forward(self, images: Tensor, targets: Targets | None = None) -> DetectorOutput:
        features = list(self.mm.extract_feat(self.to_model_input(images)))
        cls_logits, box_regs = self.head_fn(features)
        out = DetectorOutput(
            info=self._info,
            features=features,
            cls_logits=cls_logits,
            box_regs=box_regs,
            anchors=self.anchors(features),
            image_size=(images.shape[-2], images.shape[-1]),
            head_fn=self.head_fn,
            inputs=images,
        )
        if targets is not None:
            losses = self.mm.bbox_head.loss(features, self.data_samples(targets))
            out.losses = {k: sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items()}
        return out

    def head_fn(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_logits, box_regs = self.mm.bbox_head(list(features))[:2]
        return list(cls_logits), list(box_regs)

    def data_samples(self, targets: Targets) -> list[Any]:
        """rkd targets as MMDetection data samples (le90 boxes as MMRotate ``RotatedBoxes``)."""
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        h, w = targets.image_size
        boxes_type = None
        if self.rotated:
            from mmrotate.structures import RotatedBoxes as boxes_type
        else:
            from mmdet.structures.bbox import HorizontalBoxes as boxes_type
        samples = []
        for boxes, labels in zip(targets.boxes, targets.labels):
            sample = DetDataSample(
                metainfo={
                    "img_shape": (h, w),
                    "pad_shape": (h, w),
                    "ori_shape": (h, w),
                    "batch_input_shape": (h, w),
                    "scale_factor": (1.0, 1.0),
                }
            )
            sample.gt_instances = InstanceData(bboxes=boxes_type(boxes.float()), labels=labels.long())
            samples.append(sample)
        return samples

    def decode_boxes(
        self, deltas: Tensor, anchors: Tensor, stride: int | None = None, max_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """Boxes from the model's own coder (centres clamped into ``max_shape`` as its predict does),
        oriented ones normalised to rkd's le90."""
        coder = self.mm.bbox_head.bbox_coder
        if self.rotated:
            from mmrotate.structures import RotatedBoxes

            boxes = coder.decode(RotatedBoxes(anchors), deltas, max_shape=max_shape)
        else:
            boxes = coder.decode(anchors, deltas, max_shape=max_shape)
        boxes = getattr(boxes, "tensor", boxes)
        return normalize_le90(boxes) if boxes.shape[-1] == 5 else boxes

    @torch.no_grad()
    def predict(self, images: Tensor, **decode_kwargs: Any) -> list[dict[str, Tensor]]:
        """Detections per image with rkd's post-processing (see :func:`rkd.models.postprocess.decode`)."""
        was_training = self.training
        self.eval()
        try:
            out = self(images)

            def box_decoder(deltas: Tensor, anchors: Tensor, stride: int) -> Tensor:
                return self.decode_boxes(deltas, anchors, stride, max_shape=out.image_size)

            return decode(out, box_decoder=box_decoder, **decode_kwargs)
        finally:
            self.train(was_training)


def load_mm_weights(model: nn.Module, path: str | Path) -> None:
    """Load an MMDetection/MMRotate checkpoint's ``state_dict`` (tensors only: nothing is unpickled)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RkdError(
            f"{path}: cannot read it as tensors only ({type(exc).__name__}: {str(exc)[:200]}); rkd never unpickles "
            "arbitrary objects: re-save its weights alone with torch.save(torch.load(path)['state_dict'], new_path)"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RkdError(f"{path}: does not fit the config's model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def build_openmmlab_detector(spec: dict[str, Any], num_classes: int) -> OpenMMLabDetector:
    """Build (and load, with a ``checkpoint``) the OpenMMLab detector ``spec`` describes."""
    try:
        from mmengine.logging import MMLogger
    except ImportError as exc:
        raise RkdError(f"{SETUP_HINT} ({exc})") from None
    cfg = load_config(spec, num_classes)
    rotated = _is_rotated(cfg)
    registry = import_openmmlab(rotated)

    MMLogger.get_current_instance().setLevel(logging.WARNING)
    try:
        mm_model = registry.build(cfg.model)
    except Exception as exc:
        raise RkdError(f"{spec['config']}: cannot build its model ({type(exc).__name__}: {exc})") from None
    mm_model.init_weights()
    if spec.get("checkpoint"):
        load_mm_weights(mm_model, spec["checkpoint"])
    preprocessor = dict(cfg.model.get("data_preprocessor") or {})
    return OpenMMLabDetector(mm_model, spec, rotated, preprocessor)
