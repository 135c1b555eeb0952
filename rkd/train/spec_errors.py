"""Pydantic's validation errors told the rkd way: ``dotted.path: message``, with "did you mean" for a
misspelt key, so a spec's errors read alike whichever check found them (and get file:line from
:class:`~rkd.yamlio.SourceMap` on the way up)."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Tag, ValidationError
from pydantic_core import PydanticCustomError

from rkd.errors import SpecError
from rkd.schema import join, unknown_key

# The error type of an rkd check run inside a pydantic validator (see entry_error).
ENTRY_ERROR = "rkd_entry"

# pydantic error type -> how rkd says it (the rest keep pydantic's own message)
_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


class Closed(BaseModel):
    """A mapping whose keys are all known: any other key is an error (a misspelt one, mostly).

    ``key_noun`` and ``keys_lead`` say how that error names a key of this mapping and lists the
    known ones ("unknown KD method ...; known: ...")."""

    model_config = ConfigDict(extra="forbid")
    key_noun: ClassVar[str] = "key"
    keys_lead: ClassVar[str] = "allowed:"


def entry_error(path: str, message: str) -> PydanticCustomError:
    """A finding of an rkd check run in a pydantic validator: ``path`` is relative to the entry the
    validator checks (``""``: the entry itself); :func:`first_error` puts the entry's path before it."""
    return PydanticCustomError(ENTRY_ERROR, "{message}", {"path": path, "message": message})


def _without_nulls(node: Any) -> Any:
    """An empty entry (``epochs:``) means "the default" in a spec, as absent does."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    return node


def _node_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of the entry at pydantic's ``loc`` (field names, mapping keys and union-member
    names); None where it is not modelled."""
    node: Any = model
    for key in loc:
        node = _child(node, key)
        if node is None:
            return None
    return node


def _child(node: Any, key: Any) -> Any:
    node = _unwrapped(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(key)
        return field.annotation if field is not None else None
    origin, members = get_origin(node), get_args(node)
    if origin is dict:  # a key of a free mapping: its values' annotation
        return members[1]
    if origin in (Union, UnionType):
        named = next((m for m in members if _member_name(m) == key), None)
        inside = next((c for m in members if (c := _child(m, key)) is not None), None)
        # neither: a member pydantic names (`int`, `literal['default']`) with nothing inside to walk
        return named if named is not None else inside if inside is not None else node
    return None


def _unwrapped(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` or of a named alias of it (``TypeAliasType``)."""
    annotation = getattr(annotation, "__value__", annotation)
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _member_name(member: Any) -> str | None:
    """How pydantic's ``loc`` names a union member that has keys: a model's name, or its ``Tag``."""
    if get_origin(member) is Annotated:
        return next((m.tag for m in get_args(member)[1:] if isinstance(m, Tag)), None)
    return member.__name__ if isinstance(member, type) and issubclass(member, BaseModel) else None


def _file_path(loc: tuple[Any, ...], data: Any, missing: bool) -> tuple[Any, ...]:
    """``loc`` as the keys of the entry in the document: pydantic's union-member names
    (``function-after[...]``, a model's name, a ``Tag``) are not keys of ``data`` and are dropped;
    the last key of a ``missing`` entry is kept."""
    path, node = [], data
    for i, key in enumerate(loc):
        if isinstance(node, dict) and key in node or isinstance(node, list) and key in range(len(node)):
            path.append(key)
            node = node[key]
        elif missing and i == len(loc) - 1:
            path.append(key)
    return tuple(path)


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` in ``annotation`` (also inside an Optional)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return next((v for a in get_args(annotation) if (v := _literal_values(a))), ())


def _one_of(values: tuple[Any, ...]) -> str:
    """``expected one of ['a', 'b']`` for names; ``expected auto, true or false`` as YAML writes mixed values."""
    if all(isinstance(v, str) for v in values):
        return f"expected one of {list(values)}"
    words = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return f"expected {', '.join(words[:-1])} or {words[-1]}"


def _model_in(annotation: Any) -> Any:
    """The model inside ``Annotated[Model, ...]``, ``Optional[Model]`` or ``Union[Model, ...]`` (or the annotation itself)."""
    for candidate in (annotation, *get_args(annotation)):
        candidate = _unwrapped(candidate)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation


def first_error(model: type[BaseModel], err: ValidationError, data: Any) -> SpecError:
    """The first of ``err``'s errors (an unknown key before any other) as a :class:`SpecError` whose
    path is the entry's dotted path in ``data``, the document validated."""
    found = err.errors()
    # a misspelt key explains the "required" error of the key it was meant to be: name it first
    e = next((x for x in found if x["type"] == "extra_forbidden"), found[0])
    kind = e["type"]
    loc = _file_path(e["loc"], data, missing=kind == "missing")
    path = ".".join(str(k) for k in loc)
    if kind == "extra_forbidden":
        owner = _model_in(_node_at(model, e["loc"][:-1]))
        allowed = list(getattr(owner, "model_fields", {}))
        noun, lead = getattr(owner, "key_noun", "key"), getattr(owner, "keys_lead", "allowed:")
        return unknown_key(path, str(loc[-1]), allowed, noun, lead)
    if kind == ENTRY_ERROR:  # an entry_error, or a shape pydantic's discriminator refused (its message only)
        found_at = e.get("ctx", {"path": "", "message": e["msg"]})
        return SpecError(join(path, found_at["path"]) if found_at["path"] else path, found_at["message"])
    if kind == "missing":
        return SpecError(path, "is required")
    value = e.get("input")
    if kind in _EXPECTED:
        got = f"{type(value).__name__} {value!r}" if _EXPECTED[kind] == "expected a mapping" else repr(value)
        return SpecError(path, f"{_EXPECTED[kind]}, got {got}")
    if kind == "too_short":
        least = e["ctx"]["min_length"]
        return SpecError(
            path, f"expected {'a non-empty list' if least == 1 else f'{least} items or more'}, got {value!r}"
        )
    if kind == "literal_error":
        values = _literal_values(_node_at(model, e["loc"]))
        return SpecError(
            path, f"{_one_of(values) if values else 'expected one of ' + e['ctx']['expected']}, got {value!r}"
        )
    return SpecError(path, f"{e['msg']}, got {value!r}")


def validated(model: type[BaseModel], data: Any, context: dict[str, Any] | None = None) -> BaseModel:
    """``data`` as an instance of ``model``, or the first error of ``data`` as a :class:`SpecError`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise first_error(model, err, data) from None


def check_structure(model: type[BaseModel], data: Any) -> None:
    """Raise the first structural error of ``data`` against ``model`` (nothing when it fits)."""
    validated(model, _without_nulls(data))
