"""Pydantic's validation errors told the rkd way: ``dotted.path: message``, with "did you mean" for a
misspelt key, so a spec's errors read alike whichever check found them (and get file:line from
:class:`~rkd.yamlio.SourceMap` on the way up)."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from rkd.errors import SpecError
from rkd.schema import unknown_key

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


def _without_nulls(node: Any) -> Any:
    """An empty entry (``epochs:``) means "the default" in a spec, as absent does."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    return node


def _node_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of the entry at ``loc`` (walking the model's fields); None where it is not a field."""
    node: Any = model
    for key in loc:
        fields = getattr(_model_in(node), "model_fields", None)
        if fields is None or key not in fields:
            return None
        node = fields[key].annotation
    return node


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the mapping at ``loc`` allows, for "did you mean"."""
    return list(getattr(_model_in(_node_at(model, loc)), "model_fields", {}))


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
    """The model inside ``Optional[Model]`` / ``Union[Model, ...]`` (or the annotation itself)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def first_error(model: type[BaseModel], err: ValidationError) -> SpecError:
    """The first of ``err``'s errors (an unknown key before any other) as a :class:`SpecError` whose path is the entry's dotted path."""
    found = err.errors()
    # a misspelt key explains the "required" error of the key it was meant to be: name it first
    e = next((x for x in found if x["type"] == "extra_forbidden"), found[0])
    # a union's member names (`int`, `literal['default']`) are not keys of the document
    loc = tuple(
        k for k in e["loc"] if isinstance(k, int) or "[" not in str(k) and str(k) not in ("int", "float", "bool", "str")
    )
    path = ".".join(str(k) for k in loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        return unknown_key(path, str(loc[-1]), _keys_at(model, loc[:-1]))
    if kind == "missing":
        return SpecError(path, "is required")
    value = e.get("input")
    if kind in _EXPECTED:
        got = f"{type(value).__name__} {value!r}" if _EXPECTED[kind] == "expected a mapping" else repr(value)
        return SpecError(path, f"{_EXPECTED[kind]}, got {got}")
    if kind == "literal_error":
        values = _literal_values(_node_at(model, loc))
        return SpecError(
            path, f"{_one_of(values) if values else 'expected one of ' + e['ctx']['expected']}, got {value!r}"
        )
    return SpecError(path, f"{e['msg']}, got {value!r}")


def check_structure(model: type[BaseModel], data: Any) -> None:
    """Raise the first structural error of ``data`` against ``model`` (nothing when it fits)."""
    try:
        model.model_validate(_without_nulls(data))
    except ValidationError as err:
        raise first_error(model, err) from None
