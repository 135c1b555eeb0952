"""The distiller: a set of KD components built from a ``methods`` section and summed.

A ``methods`` section maps registered method names to their hyperparameters::

    {"fitnet": {"weight": 0.5}, "hinton": {}}

Missing hyperparameters take the component's defaults; the string ``"default"`` also
means the default. A method's options (:class:`~rkd.distill.base.Option`, e.g. IFKD's
``prior``) sit next to its hyperparameters and are resolved the same way. Errors are :class:`~rkd.errors.SpecError` with a path relative to
the section (``fitnet.weight``); callers prefix their own path with ``SpecError.within``.

>>> from rkd.outputs import DetectorInfo
>>> info = DetectorInfo(level_channels=(8, 8), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
>>> d = build_distiller({"fitnet": {"weight": 0.5}}, info, info)
>>> d.hparams
{'fitnet': {'weight': 0.5, 'adapter_init': 'teacher_scale'}}
>>> validate_methods({"fitnet": {"wieght": 1}})
Traceback (most recent call last):
...
rkd.errors.SpecError: fitnet.wieght: unknown parameter; fitnet has ['adapter_init', 'weight']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd.distill.balance import balanced_terms, build_balance
from rkd.distill.base import KD_METHODS, KDComponent, check_compatible, resolve_options
from rkd.errors import SpecError
from rkd.outputs import DetectorInfo, DetectorOutput, Targets

_DETACHED_FIELDS = ("features", "cls_logits", "box_regs", "centerness", "angle_logits")


def validate_methods(
    cfg: Mapping[str, Any] | None,
    base_dir: Path | None = None,
    registry: Mapping[str, Any] | None = None,
    what: str = "KD method",
) -> dict[str, dict[str, Any]]:
    """Check a ``methods`` section without models; return it with every default filled in.

    Checks method names, parameter names and value types/choices, and the methods' options
    (relative paths in them are resolved against ``base_dir``, the spec file's folder). A
    method given as ``None`` (``fitnet:`` in YAML) takes all defaults. ``registry``: the
    methods to check against (default: the detection methods).
    """
    registry = KD_METHODS if registry is None else registry
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise SpecError("", f"the KD methods must be a mapping of method name to parameters, got {cfg!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, given in cfg.items():
        if not isinstance(name, str) or name not in registry:
            raise SpecError(str(name), f"unknown {what}; known methods are {sorted(registry)}")
        cls = registry[name]
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise SpecError(name, f"expected a mapping of parameter name to value, got {given!r}")
        resolved: dict[str, Any] = {}
        for key in given:
            if key not in cls.params and key not in cls.options:
                known = sorted({**cls.params, **cls.options})
                raise SpecError(f"{name}.{key}", f"unknown parameter; {name} has {known}")
        for key, param in cls.params.items():
            value = given.get(key, "default")
            if isinstance(value, str) and value == "default" and not (
                param.kind == "choice" and "default" in (param.choices or ())
            ):
                resolved[key] = param.default
                continue
            try:
                resolved[key] = param.validate(value, f"{name}.{key}")
            except ValueError as exc:
                msg = str(exc).removeprefix(f"{name}.{key}: ")
                raise SpecError(f"{name}.{key}", msg) from None
        try:
            resolved.update(resolve_options(cls, {k: v for k, v in given.items() if k in cls.options}, base_dir))
        except SpecError as err:
            raise err.within(name) from None
        out[name] = resolved
    return out


def detach_output(out: DetectorOutput) -> DetectorOutput:
    """A shallow copy of ``out`` whose tensors are detached (the head function is kept)."""
    changes: dict[str, Any] = {}
    for name in _DETACHED_FIELDS:
        value = getattr(out, name)
        if value is not None:
            changes[name] = [v.detach() for v in value]
    return dataclasses.replace(out, **changes)


class Distiller(nn.Module):
    """Runs the configured KD components and names their terms ``"<method>.<term>"``.

    Its parameters (adapters, learnable KD parts) train with the student and are dropped
    at export. ``hparams`` holds the resolved hyperparameters of every method.
    """

    def __init__(self, components: Mapping[str, KDComponent], balance: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.components = nn.ModuleDict(dict(components))
        self.hparams = {name: dict(c.hparams) for name, c in self.components.items()}
        self.options = {name: dict(c.options) for name, c in self.components.items() if c.options}
        # None: the weights as given and nothing measured (prior stages, unit tests of a component).
        self.balance = build_balance(self.components, balance)

    def forward(
        self,
        student_out: DetectorOutput,
        teacher_out: DetectorOutput,
        targets: Targets,
        epoch: float = 0.0,
        task_loss: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Named, weighted loss terms of all components (``{}`` when no method is configured).

        ``teacher_out`` should come from a ``torch.no_grad()`` forward; its tensors are
        detached here again so no term can backpropagate into the teacher. ``task_loss``
        (the student's own loss this step) feeds the loss balance while its window is open.
        """
        if not len(self.components):
            return {}
        teacher_out = detach_output(teacher_out)
        per_method = {name: comp(student_out, teacher_out, targets, epoch) for name, comp in self.components.items()}
        ramps = {name: comp.ramps(epoch) for name, comp in self.components.items()}
        return balanced_terms(self.balance, per_method, task_loss, self.training, ramps)

    @staticmethod
    def total(terms: Mapping[str, Tensor]) -> Tensor:
        """Sum of the terms (a zero scalar when there are none)."""
        if not terms:
            return torch.zeros(())
        return torch.stack([t.reshape(()) for t in terms.values()]).sum()

    def prior_stage_components(self) -> dict[str, KDComponent]:
        """The components that need a prior stage (see :class:`KDComponent`)."""
        return {n: c for n, c in self.components.items() if c.has_prior_stage}


def nonfinite_terms(terms: Mapping[str, Tensor]) -> list[str]:
    """Names of the terms whose value is NaN or infinite (the step should be skipped).

    >>> nonfinite_terms({"a.x": torch.tensor(1.0), "b.y": torch.tensor(float("nan"))})
    ['b.y']
    """
    bad = []
    for name, value in terms.items():
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            bad.append(name)
    return bad


def build_distiller(
    methods: Mapping[str, Any] | None,
    student: DetectorInfo,
    teacher: DetectorInfo,
    balance: Mapping[str, Any] | None = None,
) -> Distiller:
    """Validate ``methods``, check the models are compatible with each, and build the components.

    ``balance``: the ``kd_balance`` settings (:mod:`rkd.distill.balance`); None: weights as given.

    Raises :class:`~rkd.errors.SpecError` (path relative to the methods section) for an
    unknown method or parameter, a bad value, or models a method cannot work with.
    """
    resolved = validate_methods(methods)
    components: dict[str, KDComponent] = {}
    for name, hp in resolved.items():
        cls = KD_METHODS[name]
        try:
            check_compatible(cls, student, teacher, hp)
        except ValueError as exc:
            raise SpecError(name, str(exc)) from None
        components[name] = cls(student, teacher, **hp)
    return Distiller(components, balance)


__all__ = ["Distiller", "build_distiller", "detach_output", "nonfinite_terms", "validate_methods"]
