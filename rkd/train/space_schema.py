"""The parts of a search-space file's pydantic model (assembled per task by
:func:`rkd.train.spec_schema.space_model`): an entry's shapes (a range, choices, a fixed value), a
KD method's entry, the file, and the checks beyond their shapes, run as their validators: ranges
that Optuna can sample, values that a method's declared parameter admits, a method's options and
its switch. What a valid space file is, is said here once; rkd.search.space only compiles it.

Each check raises :func:`~rkd.train.spec_errors.entry_error` with a path relative to the entry it
checks, so the error names the entry's dotted path in the file (and its line) like every other.
"""

# Optional[...] / Union[...] as in rkd.train.spec_schema (the models are assembled at run time there).
# ruff: noqa: UP007, UP045

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from rkd.distill.base import Param, check_declared_sign, resolve_options
from rkd.errors import SpecError
from rkd.schema import refuse_code, unknown_key
from rkd.train.spec_errors import ENTRY_ERROR, Closed, entry_error

# The shapes of an entry, as pydantic's errors name them (rkd's messages drop them: they are not keys).
RANGE, CHOICES, VALUE = "{low, high}", "{choices}", "a value"
AMBIGUOUS_LIST = "a list is ambiguous here: write {choices: [...]} to search over it"


def entry_shape(entry: Any) -> str | None:
    """Which shape ``entry`` is written in: a range, a list of choices or a fixed value (None: a list,
    which could mean either a choice or a fixed list)."""
    if isinstance(entry, dict):
        return CHOICES if "choices" in entry else RANGE
    return None if isinstance(entry, list) else VALUE


def not_bool(value: Any) -> Any:
    """A number of a range is never ``true`` (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise entry_error("", f"expected a number, got {value!r}")
    return value


def check_range(low: float, high: float, log: bool, step: float | None, kind: str) -> None:
    """A range Optuna can sample: finite ends in order, a log scale above 0, a step that fits."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise entry_error("", f"needs finite low < high, got low={low:g}, high={high:g}")
    if log and low <= 0:
        raise entry_error("log", f"a log range needs low > 0, got {low:g}")
    if step is None:
        return
    if log:
        raise entry_error("step", "a range cannot have both step and log: true (Optuna samples one or the other)")
    if not 0 < step <= high - low:
        raise entry_error("step", f"expected a number > 0 and <= high - low ({high - low:g}), got {step!r}")
    if kind == "int":
        check_whole_step(step)


def check_whole_step(step: float | None) -> None:
    if step is not None and not float(step).is_integer():
        raise entry_error("step", f"an int range needs a whole step, got {step!r}")


def check_declared(param: Param, value: Any, at: str = "") -> None:
    """``value`` is one ``param`` admits: its type or choices, and the sign of its declared range."""
    try:
        param.validate(value, "value")
        check_declared_sign(param, value, at)
    except ValueError as err:
        raise entry_error(at, str(err).removeprefix("value: ")) from None
    except SpecError as err:
        raise entry_error(err.path, err.message) from None


def check_student_entry(entry: Any) -> Any:
    if isinstance(entry, str) and entry == "default":
        raise entry_error("", "'default' is only meaningful for a KD method's declared parameters")
    return entry


def check_switch(value: Any) -> Any:
    """A method's ``enabled``: true (always on) or the values the search may give it."""
    if value is True or isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        return value
    raise entry_error("", f"expected true or a list like [true, false], got {value!r}")


def resolved_options(method: Any, given: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """The options ``given`` to a KD method in a space, checked and resolved (never searched)."""
    try:
        resolved = resolve_options(method, given, base_dir)
    except SpecError as err:  # its path is relative to the method, as the entry's
        raise entry_error(err.path, err.message) from None
    return {name: resolved[name] for name in given}


def check_no_code(document: Any) -> Any:
    """Before any option is resolved (which imports what it names): no Python to run, unless allowed."""
    try:
        refuse_code(document, "")
    except SpecError as err:
        raise entry_error(err.path, err.message) from None
    return document


Number = Annotated[float, BeforeValidator(not_bool)]


class SpaceRange(Closed):
    low: Number = Field(description="lowest value")
    high: Number = Field(description="highest value")
    log: Optional[StrictBool] = Field(None, description="sample on a log scale")
    step: Optional[Number] = Field(None, description="grid step (not with log)")
    type: Optional[Literal["int", "float"]] = None

    @model_validator(mode="after")
    def _samplable(self) -> SpaceRange:
        check_range(self.low, self.high, bool(self.log), self.step, self.type or "float")
        return self

    def of(self, param: Param) -> SpaceRange:
        """This range for ``param``: an int range if the parameter is an int (unless ``type`` says
        otherwise), its low end a value the parameter admits."""
        ranged = self.model_copy(update={"type": "int"}) if self.type is None and param.kind == "int" else self
        if ranged.type == "int":
            check_whole_step(self.step)
        check_declared(param, self.low, "low")
        return ranged


class SpaceChoices(Closed):
    choices: list[Any] = Field(min_length=1, description="the values the sampler picks from")

    def of(self, param: Param) -> SpaceChoices:
        for choice in self.choices:
            check_declared(param, choice, "")
        return self


# a range, choices, or a fixed value ('default' for a method's parameter: the range it declares);
# a named alias, so the JSON Schema says it once
SpaceEntry = TypeAliasType(
    "SpaceEntry",
    Annotated[
        Union[
            Annotated[SpaceRange, Tag(RANGE)],
            Annotated[SpaceChoices, Tag(CHOICES)],
            Annotated[Union[str, bool, int, float], Tag(VALUE)],
        ],
        Discriminator(entry_shape, custom_error_type=ENTRY_ERROR, custom_error_message=AMBIGUOUS_LIST),
    ],
)


def declared_entry(param: Param) -> Any:
    """The entry of a method's declared parameter: a space entry whose values ``param`` admits."""

    def check(entry: Any) -> Any:
        if isinstance(entry, (SpaceRange, SpaceChoices)):
            return entry.of(param)
        if not (isinstance(entry, str) and entry == "default"):
            check_declared(param, entry)  # None (an empty entry) too: it is no value of the parameter
        return entry

    return Annotated[Optional[SpaceEntry], AfterValidator(check)]


class SpaceMethod(Closed):
    """A KD method's entry in a space: ``enabled`` and its declared parameters and options."""

    keys_lead: ClassVar[str] = "it has"
    component: ClassVar[Any] = None  # the method's class

    enabled: Annotated[Optional[Union[Literal[True], list[bool]]], BeforeValidator(check_switch)] = Field(
        None, description="true: always on; [true, false] (default): searched"
    )

    @model_validator(mode="after")
    def _options_resolved(self, info: ValidationInfo) -> SpaceMethod:
        given = {k: getattr(self, k) for k in self.component.options if k in self.model_fields_set}
        base_dir = (info.context or {}).get("base_dir")
        for name, value in resolved_options(self.component, given, base_dir).items():
            setattr(self, name, value)
        return self


class SpaceFile(Closed):
    key_noun: ClassVar[str] = "section"
    student_settings: ClassVar[tuple[str, ...]] = ()  # the keys of a spec's student section (space_model)

    student: Optional[dict[str, Annotated[Optional[SpaceEntry], AfterValidator(check_student_entry)]]] = Field(
        None, description="dotted paths into the spec's student section"
    )

    @field_validator("student")
    @classmethod
    def _student_settings(cls, student: dict[str, Any] | None) -> dict[str, Any] | None:
        """A student path starts at a setting of the student (the rest of it: ``student_check``)."""
        for path in student or {}:
            setting = path.split(".")[0]
            if cls.student_settings and setting not in cls.student_settings:
                err = unknown_key(path, setting, cls.student_settings, "student setting")
                raise entry_error(err.path, err.message)
        return student

    @model_validator(mode="before")
    @classmethod
    def _no_code(cls, document: Any) -> Any:
        return check_no_code(document)

    @model_validator(mode="after")
    def _not_empty(self) -> SpaceFile:
        methods = getattr(self, "methods", None)  # a field of the task's model (space_model)
        if not self.student and (methods is None or not methods.model_fields_set):
            raise entry_error("", "the search space is empty")
        return self
