"""Knowledge distillation for scene classifiers: the component base, its registry, the distiller
and the classic baselines (Hinton KD, FitNet, AT) on :class:`~rkd.outputs.ClassifierOutput`.

Classification has its own registry (:data:`CLASSIFIER_KD_METHODS`, filled by
:func:`register_classifier`) because its components read a different output type than the
detection ones in :data:`rkd.distill.base.KD_METHODS`; a ``methods`` section of a
``task: classification`` spec names methods of this registry. Hyperparameters are declared with
the same :class:`~rkd.distill.base.Param` objects, so defaults, validation and search ranges work
as for detection. DKD lives in :mod:`rkd.distill.dkd`, SSKDNet in :mod:`rkd.distill.sskd`.

A component reads the student's output, the teacher's (``None`` without a teacher) and the batch
labels, and returns named, already weighted terms; the distiller names them
``"<method>.<term>"`` like the detection :class:`~rkd.distill.distiller.Distiller`.

>>> from rkd.outputs import ClassifierInfo
>>> info = ClassifierInfo(level_channels=(8, 16), strides=(8, 16), num_classes=3)
>>> build_classifier_distiller({"hinton": {"temperature": 2}}, info, info).hparams
{'hinton': {'weight': 1.0, 'temperature': 2.0}}
>>> build_classifier_distiller({"hinton": {}}, info, None)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rkd.errors.SpecError: hinton: KD method 'hinton' distils a teacher's outputs, but no teacher was given; ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rkd.distill.at import at_loss
from rkd.distill.base import Param, resolve_hparams
from rkd.distill.balance import balanced_terms, build_balance
from rkd.distill.distiller import Distiller, validate_methods
from rkd.distill.functional import mse, softmax_kd
from rkd.errors import SpecError
from rkd.outputs import ClassifierInfo, ClassifierOutput


class ClassifierKDComponent(nn.Module):
    """Base class of classification KD components.

    Subclasses set ``params`` and ``needs_teacher`` and implement :meth:`forward`; the name
    is set by :func:`register_classifier`. ``teacher`` is ``None`` for a component built
    without a teacher, which only a self-distillation component (``needs_teacher = False``)
    accepts. :meth:`check_models` refuses incompatible models before training starts.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    # No options yet; declared so resolve_hparams treats both registries alike.
    options: ClassVar[dict[str, Any]] = {}
    needs_teacher: ClassVar[bool] = True
    balance_share: ClassVar[float] = 1.0  # as KDComponent.balance_share

    def __init__(self, student: ClassifierInfo, teacher: ClassifierInfo | None, **hparams: Any) -> None:
        super().__init__()
        self.student_info, self.teacher_info = student, teacher
        self.hparams = resolve_hparams(type(self), hparams)  # type: ignore[arg-type]

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        """Raise ``ValueError`` if these models cannot be distilled with these (resolved) hparams."""
        if cls.needs_teacher and teacher is None:
            raise ValueError(
                f"KD method {cls.name!r} distils a teacher's outputs, but no teacher was given; "
                "train or name a teacher, or use a self-distillation method (sskd)"
            )
        if teacher is not None and teacher.num_classes != student.num_classes:
            raise ValueError(
                "student and teacher disagree on the number of classes "
                f"({student.num_classes} vs {teacher.num_classes})"
            )

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def ramps(self, epoch: float) -> dict[str, float]:
        """Warm-up factors of named terms, applied after the loss balance (see ``KDComponent.ramps``)."""
        return {}


CLASSIFIER_KD_METHODS: dict[str, type[ClassifierKDComponent]] = {}


def register_classifier(name: str):
    """Class decorator adding a component to :data:`CLASSIFIER_KD_METHODS` under ``name``."""

    def wrap(cls: type[ClassifierKDComponent]) -> type[ClassifierKDComponent]:
        if name in CLASSIFIER_KD_METHODS:
            raise ValueError(f"classification KD method {name!r} is registered twice")
        cls.name = name
        CLASSIFIER_KD_METHODS[name] = cls
        return cls

    return wrap


def validate_classifier_methods(cfg: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Check a classification ``methods`` section without models; return it with defaults filled in.

    Errors are :class:`SpecError` with a path relative to the section (``dkd.beta``); the string
    ``"default"`` and a missing value both mean the default; ``sskd:`` (``None``) takes all defaults.

    >>> validate_classifier_methods({"dkd": {"beta": "default"}})["dkd"]["beta"]
    8.0
    >>> validate_classifier_methods({"dkd": {"betta": 1}})
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: dkd.betta: unknown parameter; dkd has ['alpha', 'beta', 'temperature', 'warmup_epochs']
    """
    return validate_methods(cfg, None, CLASSIFIER_KD_METHODS, "classification KD method")


def detach_classifier_output(out: ClassifierOutput) -> ClassifierOutput:
    """A copy of ``out`` whose tensors are detached (the teacher's side of every loss)."""
    return dataclasses.replace(
        out,
        features=[f.detach() for f in out.features],
        pooled=out.pooled.detach(),
        logits=out.logits.detach(),
        losses={k: v.detach() for k, v in out.losses.items()},
    )


class ClassifierDistiller(nn.Module):
    """Runs the configured components and names their terms ``"<method>.<term>"``.

    Its parameters (adapters, SSKDNet's branch) train with the student and are saved apart
    from it (``kd_parts.pt``), never exported. ``hparams`` holds every method's resolved values.
    """

    def __init__(
        self, components: Mapping[str, ClassifierKDComponent], balance: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.components = nn.ModuleDict(dict(components))
        self.hparams = {name: dict(c.hparams) for name, c in self.components.items()}
        self.balance = build_balance(self.components, balance)

    @property
    def needs_teacher(self) -> bool:
        return any(c.needs_teacher for c in self.components.values())

    def forward(
        self,
        student_out: ClassifierOutput,
        teacher_out: ClassifierOutput | None,
        labels: Tensor,
        epoch: float = 0.0,
        task_loss: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Named, weighted terms of all components (``{}`` when none is configured).

        ``teacher_out`` should come from a ``torch.no_grad()`` forward of a frozen teacher; it is
        detached here again so no term can reach the teacher. ``task_loss``: as for detection's
        :class:`~rkd.distill.distiller.Distiller` (the loss balance).
        """
        if teacher_out is not None:
            teacher_out = detach_classifier_output(teacher_out)
        per_method: dict[str, dict[str, Tensor]] = {}
        for name, comp in self.components.items():
            if comp.needs_teacher and teacher_out is None:
                raise ValueError(f"KD method {name!r} needs the teacher's output for this batch")
            per_method[name] = comp(student_out, teacher_out, labels, epoch)
        ramps = {name: comp.ramps(epoch) for name, comp in self.components.items()}
        return balanced_terms(self.balance, per_method, task_loss, self.training, ramps)

    total = staticmethod(Distiller.total)  # the same sum as detection's


def build_classifier_distiller(
    methods: Mapping[str, Any] | None,
    student: ClassifierInfo,
    teacher: ClassifierInfo | None,
    balance: Mapping[str, Any] | None = None,
) -> ClassifierDistiller:
    """Validate ``methods``, check the models suit each method, and build the components.

    ``teacher`` is ``None`` when there is no teacher (self-distillation only). Raises
    :class:`SpecError` (path relative to the methods section) for an unknown method or
    parameter, a bad value, a missing teacher or models a method cannot work with.
    """
    resolved = validate_classifier_methods(methods)
    components: dict[str, ClassifierKDComponent] = {}
    for name, hp in resolved.items():
        cls = CLASSIFIER_KD_METHODS[name]
        try:
            cls.check_models(student, teacher, hp)
        except ValueError as exc:
            raise SpecError(name, str(exc)) from None
        components[name] = cls(student, teacher, **hp)
    return ClassifierDistiller(components, balance)


# ----------------------------------------------------------------------------------------------
# Baselines on classifier outputs.


@register_classifier("hinton")
class ClassifierHinton(ClassifierKDComponent):
    """Hinton et al. 2015: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (eq. 1 with the T^2
    gradient scaling of section 2), mean over the batch; one term ``logits``."""

    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the logit KD term"),
        "temperature": Param("float", 4.0, 1.0, 8.0, help="softening temperature T"),
    }

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        kd = softmax_kd(student.logits, teacher.logits, self.hparams["temperature"])
        return {"logits": self.hparams["weight"] * kd}


HINT_LEVELS = ("first", "middle", "last")


def hint_level(which: str, num_levels: int) -> int:
    """Index of the ``first``/``middle``/``last`` feature level (FitNet's hint layer).

    >>> [hint_level(w, 3) for w in HINT_LEVELS], hint_level("middle", 4)
    ([0, 1, 2], 2)
    """
    return {"first": 0, "middle": num_levels // 2, "last": num_levels - 1}[which]


@register_classifier("fitnet")
class ClassifierFitNet(ClassifierKDComponent):
    """Romero et al. 2015: a 1x1 conv regressor ``r`` maps the student's hint-level map to the
    teacher's channels, ``L_hint = mean_{b,c,h,w} (t - r(s))^2`` (eq. 3, per element); one term ``feat``.

    The default level is the middle one, the paper's choice of a middle hint layer.
    """

    params = {
        "weight": Param("float", 1.0, 1e-2, 10.0, log=True, help="weight of the feature MSE"),
        "level": Param("choice", "middle", choices=HINT_LEVELS, help="which backbone level is the hint"),
    }

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        super().check_models(student, teacher, hparams)
        assert teacher is not None
        if student.num_levels != teacher.num_levels:
            raise ValueError(
                f"KD method 'fitnet' pairs levels, but the student has {student.num_levels} "
                f"and the teacher {teacher.num_levels}"
            )
        i = hint_level(hparams["level"], student.num_levels)
        if student.strides[i] != teacher.strides[i]:
            raise ValueError(
                f"KD method 'fitnet' compares the {hparams['level']} level location by location, but its stride "
                f"is {student.strides[i]} in the student and {teacher.strides[i]} in the teacher"
            )

    def __init__(self, student: ClassifierInfo, teacher: ClassifierInfo | None, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        assert teacher is not None
        self.index = hint_level(self.hparams["level"], student.num_levels)
        self.regressor = nn.Conv2d(student.level_channels[self.index], teacher.level_channels[self.index], 1)

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        hint = mse(self.regressor(student.features[self.index]), teacher.features[self.index])
        return {"feat": self.hparams["weight"] * hint}


@register_classifier("at")
class ClassifierAT(ClassifierKDComponent):
    """Zagoruyko & Komodakis 2017: ``beta/2 * sum_l mean_{b,j} (Q_s/|Q_s| - Q_t/|Q_t|)_j^2`` with
    ``Q = vec(mean_c F^2)`` (eqs. 1-2, p = 2) over every backbone level; one term ``attn``."""

    params = {
        "weight": Param("float", 1000.0, 10.0, 1e4, log=True, help="beta of eq. 2 (paper and released: 1e3)"),
    }

    @classmethod
    def check_models(cls, student: ClassifierInfo, teacher: ClassifierInfo | None, hparams: dict[str, Any]) -> None:
        super().check_models(student, teacher, hparams)
        assert teacher is not None
        if tuple(student.strides) != tuple(teacher.strides):
            raise ValueError(
                f"KD method 'at' compares attention maps location by location, but the student's strides "
                f"{list(student.strides)} differ from the teacher's {list(teacher.strides)}"
            )

    def forward(
        self, student: ClassifierOutput, teacher: ClassifierOutput | None, labels: Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        assert teacher is not None
        total = sum(at_loss(fs, ft) for fs, ft in zip(student.features, teacher.features))
        return {"attn": self.hparams["weight"] / 2 * total}


# The other methods register themselves on import; imported last because they import this module.
from rkd.distill import dkd as _dkd  # noqa: E402,F401
from rkd.distill import sskd as _sskd  # noqa: E402,F401

__all__ = [
    "CLASSIFIER_KD_METHODS",
    "ClassifierDistiller",
    "ClassifierKDComponent",
    "build_classifier_distiller",
    "detach_classifier_output",
    "register_classifier",
    "validate_classifier_methods",
]
