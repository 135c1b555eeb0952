"""Small helpers for validating spec sections with errors that name the entry's path.

>>> s = Section({"epochs": 3, "lr": "x"}, "student")
>>> s.int("epochs", low=1)
3
>>> s.float("lr", 0.1)
Traceback (most recent call last):
...
rkd.errors.SpecError: student.lr: expected a number, got 'x'
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

from rkd.errors import SpecError

_MISSING = object()
ALLOW_CODE_ENV = "RKD_ALLOW_CODE"


def refuse_code(node: Any, path: str) -> None:
    """Refuse an entry that names Python to import and run (a prior's ``target: "package.module:Name"``)
    unless the user opted in: a spec from someone else must not run ``os:system`` on this machine."""
    if os.environ.get(ALLOW_CODE_ENV) == "1":
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = join(path, str(key))
        if key == "target" and isinstance(value, str):
            raise SpecError(
                where,
                f"names Python code to import and run ({value!r}); a spec is code then, so rkd "
                f"runs it only when asked: rerun with --allow-code or {ALLOW_CODE_ENV}=1 if you trust it",
            )
        refuse_code(value, where)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def set_dotted(target: dict[str, Any], path: str, value: Any) -> None:
    """Set a nested entry by dotted path, creating mappings on the way.

    >>> d = {"model": {"backbone": {"width": 1.0}}}
    >>> set_dotted(d, "model.backbone.width", 0.5); d
    {'model': {'backbone': {'width': 0.5}}}
    """
    keys = path.split(".")
    node = target
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def get_dotted(source: dict[str, Any], path: str) -> Any:
    """A nested entry by dotted path (the reader of :func:`set_dotted`); None where a key is missing.

    >>> get_dotted({"model": {"backbone": {"width": 0.5}}}, "model.backbone.width")
    0.5
    >>> get_dotted({"model": {"backbone": 1}}, "model.backbone.width") is None
    True
    """
    node: Any = source
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def unknown_key(
    where: str, key: str, allowed: set[str] | list[str], noun: str = "key", lead: str = "allowed:"
) -> SpecError:
    """The error for a key a mapping does not allow: the closest allowed key, then all of them.
    ``noun`` names what the key should be (``KD method``), ``lead`` introduces the list.

    >>> print(unknown_key("methods.fitnett", "fitnett", ["fitnet", "hinton"], "KD method", "known:"))
    methods.fitnett: unknown KD method (did you mean 'fitnet'?); known: fitnet, hinton
    """
    hint = difflib.get_close_matches(key, list(allowed), n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return SpecError(where, f"unknown {noun}{did}; {lead} {', '.join(sorted(allowed))}")


class Section:
    """A mapping from a spec being validated; every read checks type and range."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SpecError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
        self.data, self.path = data, path

    def where(self, key: str) -> str:
        return join(self.path, key)

    def reject_unknown(self, allowed: set[str] | list[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise unknown_key(self.where(str(key)), str(key), allowed)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise SpecError(self.where(key), "is required")
            return default
        return self.data[key]

    def section(self, key: str, required: bool = False) -> Section:
        return Section(self.raw(key, _MISSING if required else {}), self.where(key))

    def int(self, key: str, default: Any = _MISSING, low: int | None = None, high: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(self.where(key), f"expected an integer, got {value!r}")
        self._range(key, value, low, high)
        return value

    def float(
        self,
        key: str,
        default: Any = _MISSING,
        low: float | None = None,
        high: float | None = None,
        above: float | None = None,
    ) -> float:
        """A finite number in ``[low, high]``; ``above``: an exclusive lower bound (an lr of 0 trains nothing)."""
        value = self.raw(key, default)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(self.where(key), f"expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN compares false with every bound: it would pass them all
            raise SpecError(self.where(key), f"expected a finite number, got {value!r}")
        if above is not None and value <= above:
            raise SpecError(self.where(key), f"must be > {above}, got {value}")
        self._range(key, value, low, high)
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise SpecError(self.where(key), f"expected true or false, got {value!r}")
        return value

    def str(self, key: str, default: Any = _MISSING, choices: list[str] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise SpecError(self.where(key), f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise SpecError(self.where(key), f"expected one of {choices}, got {value!r}")
        return value

    def file_path(self, key: str, base: Path, default: Any = _MISSING, must_exist: bool = True) -> Path | None:
        """A filesystem path; relative paths are resolved against ``base`` (the spec's folder)."""
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise SpecError(self.where(key), f"expected a path, got {value!r}")
        resolved = (base / Path(value).expanduser()).resolve()
        if must_exist and not resolved.exists():
            raise SpecError(self.where(key), f"path does not exist: {resolved}")
        return resolved

    def _range(self, key: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise SpecError(self.where(key), f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise SpecError(self.where(key), f"must be <= {high}, got {value}")
