"""The interface every KD component implements, its parameter declarations and the registry.

A component is a small ``nn.Module``: it owns its learnable parts (adapters,
filters, ...), which train with the student and are dropped at export, and
computes named loss terms from a student's and a teacher's output. A component serves one
task (:data:`TASKS`): a detection component reads :class:`~rkd.outputs.DetectorOutput`
and the batch :class:`~rkd.outputs.Targets`, a classification component
:class:`~rkd.outputs.ClassifierOutput` and the batch labels (and, when it distils without a
teacher, gets ``None`` for the teacher). The arithmetic of each loss is a plain function of
tensors (:mod:`rkd.distill.functional` or next to the class).

Each component declares its hyperparameters as :class:`Param` objects:
defaults for a single run, ranges for the search. A search-space YAML refers
to them by name (``fitnet: {weight: default}``). Settings that are not hyperparameters (a
prior encoder and its checkpoint file, the schedule of a prior stage) are :class:`Option` objects
in ``options``: given in the spec next to the Params, validated when the spec is loaded, never
searched. :func:`register` adds a component to the registry of its task
(:data:`KD_METHODS` for detection, :data:`CLASSIFIER_KD_METHODS` for classification).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from rkd.distill.checks import check_same_anchors, check_same_grid
from rkd.errors import SpecError
from rkd.outputs import ClassifierInfo, ClassifierOutput, DetectorInfo, DetectorOutput, Targets

# The tasks a component can serve; each has its own registry below.
TASKS = ("detection", "classification")


@dataclass(frozen=True)
class Param:
    """A typed hyperparameter with its default and search range.

    ``kind`` is ``float``, ``int``, ``bool`` or ``choice``. Numeric kinds use
    ``low``/``high`` (and ``log``); ``choice`` uses ``choices``; ``bool`` has
    choices ``(False, True)`` implicitly.
    """

    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""
    # The paper's or released code's value where rkd's default differs from it (a default measured
    # better on real data, with the figures beside the Param); None: the default is the published value.
    published: Any = None

    @property
    def published_value(self) -> Any:
        """What the method's published configuration uses (``published_defaults`` points, ``@published``)."""
        return self.default if self.published is None else self.published

    def __post_init__(self) -> None:
        if self.kind not in ("float", "int", "bool", "choice"):
            raise ValueError(f"Param kind must be float, int, bool or choice, not {self.kind!r}")
        if self.kind in ("float", "int"):
            if self.low is None or self.high is None or not self.low <= self.high:
                raise ValueError(f"numeric Param needs low <= high, got {self.low}, {self.high}")
            if self.log and self.low <= 0:
                raise ValueError("a log-scaled Param needs low > 0")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice Param needs choices")
        if self.published is not None:
            self.validate(self.published, "published")

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise ``ValueError``."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true/false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{where}: expected one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ValueError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value) if self.kind == "float" else value

    def resolve(self, value: Any, where: str) -> Any:
        """:meth:`validate`, except that the string ``"default"`` means :attr:`default` (unless it is
        one of a choice's values). A spec, a search space and a component built in code read it alike.

        >>> Param("float", 1.0, 0.1, 10.0).resolve("default", "hinton.weight")
        1.0
        """
        if isinstance(value, str) and value == "default" and not (self.kind == "choice" and "default" in self.choices):
            return self.default
        return self.validate(value, where)


def check_declared_sign(param: Param, value: Any, where: str) -> None:
    """Refuse a value on the wrong side of 0 for its declared range: a range declared above 0 (KD weights
    on a log scale, temperatures) admits nothing <= 0, one starting at 0 nothing below it. A negative KD
    weight pushes the student away from the teacher; a temperature of 0 divides by zero.

    >>> check_declared_sign(Param("float", 1.0, 0.1, 10.0), 0.0, "hinton.weight")
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: hinton.weight: must be > 0 (declared range 0.1 to 10), got 0.0
    """
    if param.kind not in ("float", "int") or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if param.low > 0 and value <= 0:
        raise SpecError(where, f"must be > 0 (declared range {param.low:g} to {param.high:g}), got {value!r}")
    if param.low >= 0 and value < 0:
        raise SpecError(where, f"must be >= 0 (declared range {param.low:g} to {param.high:g}), got {value!r}")


@dataclass(frozen=True)
class Option:
    """A fixed, non-searchable setting of a component, given in the spec next to its Params.

    ``check(value, base_dir)`` returns the value normalised (JSON-able: relative paths resolved
    against ``base_dir``, the spec file's folder, and made absolute) or raises
    :class:`~rkd.errors.SpecError` whose path is relative to the option (``""`` for the option
    itself, ``"checkpoint"`` for a key inside it). It must accept its own output unchanged:
    a resolved ``methods`` section is validated again in every worker. ``check=None`` takes any value.

    >>> opt = number_option("int", 3, low=1)
    >>> opt.check(5, None), opt.default
    (5, 3)
    >>> opt.check(0, None)
    Traceback (most recent call last):
    ...
    rkd.errors.SpecError: expected an integer >= 1, got 0
    """

    default: Any
    check: Callable[[Any, Path | None], Any] | None = None
    help: str = ""

    def resolve(self, value: Any, base_dir: Path | None) -> Any:
        return value if self.check is None else self.check(value, base_dir)


def published_hparams(params: dict[str, Param]) -> dict[str, Any]:
    """The parameters whose published value differs from rkd's default, at their published value.

    >>> published_hparams({"a": Param("bool", False, published=True), "b": Param("bool", True)})
    {'a': True}
    """
    return {name: p.published for name, p in params.items() if p.published is not None}


def number_option(kind: str, default: float, low: float | None = None, help: str = "") -> Option:
    """An :class:`Option` holding an ``int`` or ``float`` not below ``low``."""

    def check(value: Any, base_dir: Path | None) -> Any:
        name = "an integer" if kind == "int" else "a number"
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        bad = bad or (kind == "int" and float(value) != int(value)) or (low is not None and value < low)
        if bad:
            bound = f" >= {low:g}" if low is not None else ""
            raise SpecError("", f"expected {name}{bound}, got {value!r}")
        return int(value) if kind == "int" else float(value)

    return Option(default, check, help)


Info = DetectorInfo | ClassifierInfo
Output = DetectorOutput | ClassifierOutput


class KDComponent(nn.Module):
    """Base class of distillation components, detection and classification alike.

    Subclasses set ``name`` and ``task`` (through :func:`register`), ``params`` and
    ``requires`` and implement :meth:`forward`, returning a dict of named,
    already weighted loss terms. ``requires`` lists the detector output fields a detection
    component needs beyond features and logits: ``"angle"`` (oriented boxes),
    ``"angle_bins"`` (an angle classification branch, ``DetectorInfo.angle_bins > 0``),
    ``"centerness"``, ``"assignment"``, and the pairing its losses need: ``"same_grid"``
    (student and teacher feature maps share strides, :func:`rkd.distill.checks.check_same_grid`)
    or ``"same_anchors"`` (that and as many anchors per location,
    :func:`~rkd.distill.checks.check_same_anchors`). :func:`check_compatible` refuses a
    model that lacks them before any training starts; a component with further
    conditions overrides :meth:`check_models`.

    ``teacher`` is ``None`` for a component built without a teacher, which only a
    self-distillation component (``needs_teacher = False``, classification's ``sskd``) accepts.
    ``forward``'s third argument is the batch :class:`~rkd.outputs.Targets` (detection) or the
    labels ``(B,)`` (classification).
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = "detection"
    needs_teacher: ClassVar[bool] = True
    params: ClassVar[dict[str, Param]] = {}
    options: ClassVar[dict[str, Option]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    # Default strength against the other methods under ``kd_balance: auto`` (rkd.distill.balance):
    # the method pulls ``ratio * balance_share`` times as hard as the task loss. 1 unless measured.
    balance_share: ClassVar[float] = 1.0

    def __init__(self, student: Info, teacher: Info | None, **hparams: Any) -> None:
        super().__init__()
        self.student_info = student
        self.teacher_info = teacher
        cls = type(self)
        given_options = {k: hparams.pop(k) for k in list(hparams) if k in cls.options}
        # Options the caller did not give take their defaults; given ones are checked again
        # (idempotent) so a component built in code gets the same validation as one from a spec.
        self.options = resolve_options(cls, given_options)
        self.hparams = resolve_hparams(cls, hparams)

    @classmethod
    def check_models(cls, student: Info, teacher: Info | None, hparams: dict[str, Any]) -> None:
        """Raise ``ValueError`` if these models cannot be distilled with these (resolved) hparams.

        Called by :func:`check_compatible` after the checks every method of the task needs."""

    def forward(
        self, student: Output, teacher: Output | None, targets: Targets | Tensor, epoch: float = 0.0
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def balance_units(self) -> tuple[str, ...]:
        """The terms the loss balance scales one by one, each to its equal part of
        ``balance_share`` (:func:`rkd.distill.balance.build_balance`); empty (the default): the
        method's terms are scaled together, at their own relative weights."""
        return ()

    def ramps(self, epoch: float) -> dict[str, float]:
        """Factors of named terms at ``epoch``, applied after the loss balance (none by default).

        A warm-up belongs here, not in :meth:`forward`: the balance (:mod:`rkd.distill.balance`)
        then measures each term at full strength, and the ramp still starts it at 0.
        """
        return {}

    # A component that needs a stage of its own before distillation (DS2D2's high-frequency
    # amplifier is trained on the teacher alone) overrides these; the training layer runs that
    # stage once, caches ``prior_state_dict()`` by content hash and reuses it across trials.
    # ``prior_stage_keys`` names the hparams and options that shape the prior modules or their
    # training: with the teacher and the data they form the cache key of the stage's result.
    # Such a component also declares the options of PRIOR_STAGE_OPTIONS (its schedule).
    has_prior_stage: ClassVar[bool] = False
    prior_stage_keys: ClassVar[tuple[str, ...]] = ()

    def prior_stage_config(self) -> dict[str, Any]:
        """The values of ``prior_stage_keys`` (hparams and options alike)."""
        merged = {**self.hparams, **self.options}
        return {k: merged[k] for k in self.prior_stage_keys}

    def prior_stage_loss(self, teacher: DetectorOutput, targets: Targets) -> Tensor:
        raise NotImplementedError(f"{self.name} has no prior stage")

    def prior_stage_modules(self) -> nn.Module | None:
        """The modules trained (and cached) by the prior stage; frozen during distillation."""
        return None


PRIOR_STAGE_OPTIONS: dict[str, Option] = {
    "prior_epochs": number_option("int", 4, low=1, help="epochs of the prior stage over the train split"),
    "prior_lr": number_option("float", 1e-3, low=0.0, help="Adam learning rate of the prior stage"),
}

KD_METHODS: dict[str, type[KDComponent]] = {}  # detection methods, by name
CLASSIFIER_KD_METHODS: dict[str, type[KDComponent]] = {}  # classification methods, by name
REGISTRIES: dict[str, dict[str, type[KDComponent]]] = {"detection": KD_METHODS, "classification": CLASSIFIER_KD_METHODS}
# How errors name a method of each task ("unknown classification KD method").
METHOD_LABELS = {"detection": "KD method", "classification": "classification KD method"}


def methods_of(task: str) -> dict[str, type[KDComponent]]:
    """The registry of ``task`` (name -> component class)."""
    if task not in REGISTRIES:
        raise ValueError(f"unknown task {task!r}; KD methods serve {list(TASKS)}")
    return REGISTRIES[task]


def register(name: str, task: str = "detection"):
    """Class decorator adding a component to the registry of ``task`` under ``name``."""
    registry = methods_of(task)

    def wrap(cls: type[KDComponent]) -> type[KDComponent]:
        if name in registry:
            raise ValueError(f"{METHOD_LABELS[task]} {name!r} is registered twice")
        clash = sorted(set(cls.params) & set(cls.options))
        if clash:
            raise ValueError(f"KD method {name!r} declares {clash} both as a Param and as an Option")
        cls.name = name
        cls.task = task
        registry[name] = cls
        return cls

    return wrap


def resolve_hparams(cls: type[KDComponent], given: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Defaults of ``cls.params`` overridden by ``given`` (:meth:`Param.resolve`: ``"default"`` is the
    default); unknown names raise ``ValueError``."""
    where = where or cls.name
    unknown = sorted(set(given) - set(cls.params) - set(cls.options))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; {cls.name} has {sorted(cls.params)}")
    return {k: p.resolve(given[k], f"{where}.{k}") if k in given else p.default for k, p in cls.params.items()}


def resolve_options(cls: type[KDComponent], given: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """Every option of ``cls``: ``given`` ones checked (``"default"`` means the default), others defaulted.

    Raises :class:`~rkd.errors.SpecError` with a path relative to the method (``prior.kind``).
    """
    out: dict[str, Any] = {}
    for key, opt in cls.options.items():
        value = given.get(key, "default")
        if isinstance(value, str) and value == "default":
            out[key] = opt.default
            continue
        try:
            out[key] = opt.resolve(value, base_dir)
        except SpecError as err:
            raise err.within(key) from None
    return out


def check_compatible(
    cls: type[KDComponent], student: Info, teacher: Info | None, hparams: dict[str, Any] | None = None
) -> None:
    """Raise ``ValueError`` if the models lack what the component requires.

    ``hparams`` (resolved) are passed to :meth:`KDComponent.check_models` when given.
    """
    if cls.task == "classification":
        if cls.needs_teacher and teacher is None:
            raise ValueError(
                f"KD method {cls.name!r} distils a teacher's outputs, but no teacher was given; "
                "train or name a teacher, or use a self-distillation method (sskd)"
            )
        if teacher is not None:
            _check_same_classes(student, teacher)
        if hparams is not None:
            cls.check_models(student, teacher, hparams)
        return
    for info, role in ((student, "student"), (teacher, "teacher")):
        if "angle" in cls.requires and not info.oriented:
            raise ValueError(f"KD method {cls.name!r} needs oriented boxes, but the {role} predicts horizontal boxes")
        if "angle_bins" in cls.requires and info.angle_bins <= 0:
            raise ValueError(
                f"KD method {cls.name!r} needs an angle classification branch (angle_bins > 0), which the {role} lacks"
            )
        if "centerness" in cls.requires and not info.has_centerness:
            raise ValueError(f"KD method {cls.name!r} needs a centerness branch, which the {role} lacks")
    _check_same_classes(student, teacher)
    if len(student.strides) != len(teacher.strides):
        raise ValueError("student and teacher have different numbers of FPN levels")
    if "same_anchors" in cls.requires:
        check_same_anchors(cls.name, student, teacher)
    elif "same_grid" in cls.requires:
        check_same_grid(cls.name, student, teacher)
    if hparams is not None:
        cls.check_models(student, teacher, hparams)


def _check_same_classes(student: Info, teacher: Info) -> None:
    if student.num_classes != teacher.num_classes:
        raise ValueError(
            f"student and teacher disagree on the number of classes ({student.num_classes} vs {teacher.num_classes})"
        )


def linear_ramp(epoch: float, warmup_epochs: float) -> float:
    """``min(epoch / warmup_epochs, 1)``; 1 without a warm-up.

    >>> linear_ramp(0.5, 2.0), linear_ramp(3.0, 2.0), linear_ramp(0.0, 0.0)
    (0.25, 1.0, 1.0)
    """
    return min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
