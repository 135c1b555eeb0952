"""The distiller: a set of KD components built from a ``methods`` section and summed.

One distiller serves both tasks: detection components on :class:`~rkd.outputs.DetectorOutput`
and :class:`~rkd.outputs.Targets`, classification components on
:class:`~rkd.outputs.ClassifierOutput` and the batch labels. A ``methods`` section maps
registered method names (of the task's registry, :func:`rkd.distill.base.methods_of`) to their
hyperparameters::

    {"fitnet": {"weight": 0.5}, "hinton": {}}

Missing hyperparameters take the component's defaults; the string ``"default"`` also
means the default. A method's options (:class:`~rkd.distill.base.Option`, e.g. IFKD's
``prior``) sit next to its hyperparameters and are resolved the same way. Errors are :class:`~rkd.errors.SpecError` with a path relative to
the section (``fitnet.weight``); callers prefix their own path with ``SpecError.within``.

>>> from rkd.outputs import ClassifierInfo, DetectorInfo
>>> info = DetectorInfo(level_channels=(8, 8), strides=(8, 16), num_classes=3, num_anchors=1, box_dim=5)
>>> d = build_distiller({"fitnet": {"weight": 0.5}}, info, info)
>>> d.hparams
{'fitnet': {'weight': 0.5, 'adapter_init': 'teacher_scale'}}
>>> validate_methods({"fitnet": {"wieght": 1}})
Traceback (most recent call last):
...
rkd.errors.SpecError: fitnet.wieght: unknown parameter; fitnet has ['adapter_init', 'weight']
>>> validate_methods({"dkd": {"beta": "default"}}, task="classification")["dkd"]["beta"]
8.0
>>> validate_methods({"dkd": {"betta": 1}}, task="classification")
Traceback (most recent call last):
...
rkd.errors.SpecError: dkd.betta: unknown parameter; dkd has ['alpha', 'beta', 'temperature', 'warmup_epochs']
>>> scenes = ClassifierInfo(level_channels=(8, 16), strides=(8, 16), num_classes=3)
>>> build_distiller({"hinton": {"temperature": 2}}, scenes, scenes).hparams
{'hinton': {'weight': 1.0, 'temperature': 2.0}}
>>> build_distiller({"hinton": {}}, scenes, None)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rkd.errors.SpecError: hinton: KD method 'hinton' distils a teacher's outputs, but no teacher was given; ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rkd.distill.balance import balanced_terms, build_balance
from rkd.distill.base import (
    METHOD_LABELS,
    Info,
    KDComponent,
    Output,
    check_compatible,
    check_declared_sign,
    methods_of,
    resolve_options,
)
from rkd.errors import SpecError
from rkd.outputs import ClassifierInfo, ClassifierOutput, DetectorOutput, Targets

# The tensor fields of each output type (and its subclasses) that are detached on the teacher's side.
_DETACHED_FIELDS = {
    DetectorOutput: ("features", "cls_logits", "box_regs", "centerness", "angle_logits"),
    ClassifierOutput: ("features", "pooled", "logits", "losses"),
}


def validate_methods(
    cfg: Mapping[str, Any] | None, base_dir: Path | None = None, *, task: str = "detection"
) -> dict[str, dict[str, Any]]:
    """Check a ``methods`` section of ``task`` without models; return it with every default filled in.

    Checks method names (against the task's registry), parameter names, value types/choices and
    signs (:func:`~rkd.distill.base.check_declared_sign`), and the methods' options (relative paths
    in them are resolved against ``base_dir``, the spec file's folder). A method given as ``None``
    (``fitnet:`` in YAML) takes all defaults; ``"default"`` means the default (:meth:`Param.resolve`).
    """
    registry = methods_of(task)
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise SpecError("", f"the KD methods must be a mapping of method name to parameters, got {cfg!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, given in cfg.items():
        if not isinstance(name, str) or name not in registry:
            raise SpecError(str(name), f"unknown {METHOD_LABELS[task]}; known methods are {sorted(registry)}")
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
            try:
                resolved[key] = param.resolve(given.get(key, "default"), f"{name}.{key}")
            except ValueError as exc:
                msg = str(exc).removeprefix(f"{name}.{key}: ")
                raise SpecError(f"{name}.{key}", msg) from None
        try:
            resolved.update(resolve_options(cls, {k: v for k, v in given.items() if k in cls.options}, base_dir))
        except SpecError as err:
            raise err.within(name) from None
        out[name] = resolved
    for name, values in out.items():  # signs last: a misspelt method or parameter is reported first
        for key, param in registry[name].params.items():
            check_declared_sign(param, values[key], f"{name}.{key}")
    return out


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: v.detach() for k, v in value.items()}
    return [v.detach() for v in value]


def detach_output(out: Output) -> Output:
    """A shallow copy of ``out`` whose tensors are detached (the teacher's side of every loss; a
    detector's head functions are kept)."""
    fields = next(names for kind, names in _DETACHED_FIELDS.items() if isinstance(out, kind))
    changes = {name: _detached(getattr(out, name)) for name in fields if getattr(out, name) is not None}
    return dataclasses.replace(out, **changes)


class Distiller(nn.Module):
    """Runs the configured KD components and names their terms ``"<method>.<term>"``.

    Its parameters (adapters, learnable KD parts such as SSKDNet's branch) train with the student
    and are saved apart from it (``kd_parts``), never exported. ``hparams`` holds the resolved
    hyperparameters of every method.
    """

    def __init__(self, components: Mapping[str, KDComponent], balance: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.components = nn.ModuleDict(dict(components))
        self.hparams = {name: dict(c.hparams) for name, c in self.components.items()}
        self.options = {name: dict(c.options) for name, c in self.components.items() if c.options}
        # None: the weights as given and nothing measured (prior stages, unit tests of a component).
        self.balance = build_balance(self.components, balance)

    @property
    def needs_teacher(self) -> bool:
        """Whether a component reads the teacher's output (not so for self-distillation alone)."""
        return any(c.needs_teacher for c in self.components.values())

    def forward(
        self,
        student_out: Output,
        teacher_out: Output | None,
        targets: Targets | Tensor,
        epoch: float = 0.0,
        task_loss: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Named, weighted loss terms of all components (``{}`` when no method is configured).

        ``targets``: the batch :class:`~rkd.outputs.Targets` (detection) or labels (classification).
        ``teacher_out`` should come from a ``torch.no_grad()`` forward of a frozen teacher (``None``
        without a teacher: self-distillation only); its tensors are detached here again so no term
        can backpropagate into the teacher. ``task_loss`` (the student's own loss this step) feeds
        the loss balance while its window is open.
        """
        if not len(self.components):
            return {}
        if teacher_out is not None:
            teacher_out = detach_output(teacher_out)
        per_method: dict[str, dict[str, Tensor]] = {}
        for name, comp in self.components.items():
            if comp.needs_teacher and teacher_out is None:
                raise ValueError(f"KD method {name!r} needs the teacher's output for this batch")
            per_method[name] = comp(student_out, teacher_out, targets, epoch)
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
    student: Info,
    teacher: Info | None,
    balance: Mapping[str, Any] | None = None,
) -> Distiller:
    """Validate ``methods``, check the models are compatible with each, and build the components.

    The task is the models': classification for :class:`~rkd.outputs.ClassifierInfo`, else detection.
    ``teacher`` is ``None`` when there is no teacher (classification's self-distillation only).
    ``balance``: the ``kd_balance`` settings (:mod:`rkd.distill.balance`); None: weights as given.

    Raises :class:`~rkd.errors.SpecError` (path relative to the methods section) for an
    unknown method or parameter, a bad value, a missing teacher or models a method cannot work with.
    """
    task = "classification" if isinstance(student, ClassifierInfo) else "detection"
    resolved = validate_methods(methods, task=task)
    components: dict[str, KDComponent] = {}
    for name, hp in resolved.items():
        cls = methods_of(task)[name]
        try:
            check_compatible(cls, student, teacher, hp)
        except ValueError as exc:
            raise SpecError(name, str(exc)) from None
        components[name] = cls(student, teacher, **hp)
    return Distiller(components, balance)


__all__ = ["Distiller", "build_distiller", "detach_output", "nonfinite_terms", "validate_methods"]
