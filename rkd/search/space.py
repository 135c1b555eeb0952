"""Search spaces: a declarative YAML compiled to an Optuna define-by-run function.

A space file has two sections::

    student:                     # dotted paths into the spec's `student:` section
      model.backbone.width: {choices: [0.25, 0.5, 1.0]}
      lr: {low: 5.0e-4, high: 5.0e-3, log: true}
    methods:                     # KD methods the search may switch on
      fitnet:
        weight: default          # the range the method declares for this parameter
      hinton:
        enabled: [true, false]   # default; `true` keeps the method always on
        weight: {low: 0.1, high: 10.0, log: true}
        temperature: 4           # a fixed value

A method's parameters are sampled only when the method is on (conditional
parameters, which is why TPE runs with ``multivariate=True, group=True``).
Parameters named in the space are the searched ones; the rest keep the
method's defaults. Entries are validated when the space is loaded: an unknown
method, parameter or student path fails with the file and line of the entry.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rkd.distill  # noqa: F401  (importing the package registers every method)
from rkd.distill.base import KD_METHODS, Param, check_declared_sign, resolve_options
from rkd.errors import SpecError
from rkd.schema import join, refuse_code
from rkd.yamlio import load_yaml

METHOD_SWITCH = "enabled"
# The student's KD loss balance mode (rkd.distill.balance): published-defaults points run with "off",
# the methods' weights as published; the sampler may choose either.
BALANCE_MODE = "student.kd_balance.mode"


@dataclass(frozen=True)
class Dim:
    """One searched (or fixed) parameter. ``condition`` names the method switch it depends on."""

    name: str
    kind: str  # float | int | choice | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    condition: str | None = None

    def size(self) -> float:
        """Number of distinct values (inf for continuous ranges)."""
        if self.kind == "fixed":
            return 1
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "int":
            return int(self.high - self.low) // int(self.step or 1) + 1
        return math.inf

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is one this dim can produce."""
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        on_grid = (
            self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9
        )
        return self.low <= value <= self.high and (self.kind != "int" or float(value).is_integer()) and on_grid

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"= {self.value!r}"
        if self.kind == "choice":
            return "{" + ", ".join(repr(c) for c in self.choices) + "}"
        scale = " log" if self.log else ""
        return f"[{self.low:g}, {self.high:g}]{scale} {self.kind}"


@dataclass
class SearchSpace:
    dims: list[Dim]
    file: str
    registry: dict[str, Any] | None = None  # the KD methods it refers to (None: detection's)

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest every active dim; return the fixed ones as constants."""
        chosen: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for d in self.dims:
            if d.condition is not None and not chosen.get(d.condition, False):
                continue
            if d.kind == "fixed":
                chosen[d.name] = constants[d.name] = d.value
            elif d.kind == "choice":
                chosen[d.name] = trial.suggest_categorical(d.name, list(d.choices))
            elif d.kind == "int":
                chosen[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
            else:
                chosen[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log, step=d.step)
        return constants

    def methods(self) -> list[str]:
        return [d.name.split(".", 1)[1] for d in self.dims if d.name.count(".") == 1 and d.name.startswith("methods.")]

    def baseline_point(self) -> dict[str, Any]:
        """Parameters of the "no KD" configuration: every switchable method off."""
        return {
            d.name: False
            for d in self.dims
            if d.condition is None and d.name.startswith("methods.") and d.kind == "choice"
        }

    def with_published_choices(self) -> SearchSpace:
        """This space with what published-defaults points need as choices the sampler may take too:
        the KD loss balance mode (auto | off), so they run the published weights as they are, and,
        for each method's parameter whose rkd default differs from its published value and that the
        space does not search, the choice of the two (``Param.published``). Added once."""
        names = {d.name for d in self.dims}
        added = [] if BALANCE_MODE in names else [Dim(BALANCE_MODE, "choice", choices=("auto", "off"))]
        for method in self.methods():
            for pname, param in self.declared_params(method).items():
                name = f"methods.{method}.{pname}"
                if param.published is not None and name not in names:
                    added.append(
                        Dim(name, "choice", choices=(param.default, param.published), condition=f"methods.{method}")
                    )
        return SearchSpace([*self.dims, *added], self.file, self.registry) if added else self

    def declared_params(self, method: str) -> dict[str, Param]:
        """The parameters ``method`` declares, from the space's registry (detection's by default)."""
        known = KD_METHODS if self.registry is None else self.registry
        return known[method].params if method in known else {}

    def published_default_points(self) -> dict[str, dict[str, Any]]:
        """For each switchable method: it alone, at its published values (``Param.published_value``),
        and with the loss balance off where the space has that choice (see :meth:`with_published_choices`).

        A default the space's range excludes is left for the sampler (a partial point).
        Parameters outside the methods (the student's size, lr, ...) are left to the sampler too.
        """
        base = self.baseline_point()
        balance = next((d for d in self.dims if d.name == BALANCE_MODE and d.admits("off")), None)
        points = {}
        for switch in base:
            method = switch.split(".", 1)[1]
            point = {**base, switch: True, **({BALANCE_MODE: "off"} if balance is not None else {})}
            declared = self.declared_params(method)
            for d in self.dims:
                param = d.name.rsplit(".", 1)[1]
                if d.condition != switch or d.kind == "fixed" or param not in declared:
                    continue
                if d.admits(declared[param].published_value):
                    point[d.name] = declared[param].published_value
            points[method] = point
        return points


def _dim_from_entry(name: str, entry: Any, where: str, declared: Param | None, condition: str | None) -> Dim:
    if entry == "default":
        if declared is None:
            raise SpecError(where, "'default' is only meaningful for a KD method's declared parameters")
        if declared.kind in ("bool", "choice"):
            choices = (False, True) if declared.kind == "bool" else tuple(declared.choices)
            return Dim(name, "choice", choices=choices, condition=condition)
        return Dim(name, declared.kind, low=declared.low, high=declared.high, log=declared.log, condition=condition)
    if isinstance(entry, dict):
        keys = set(entry)
        if "choices" in keys:
            if keys - {"choices"}:
                raise SpecError(where, f"'choices' cannot be combined with {sorted(keys - {'choices'})}")
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                raise SpecError(join(where, "choices"), f"expected a non-empty list, got {choices!r}")
            return Dim(name, "choice", choices=tuple(choices), condition=condition)
        allowed = {"low", "high", "log", "step", "type"}
        if not keys or keys - allowed:
            raise SpecError(
                where, f"expected {{choices: [...]}} or {{low, high[, log, step, type]}}, got keys {sorted(keys)}"
            )
        for bound in ("low", "high"):
            if bound not in entry:
                raise SpecError(where, f"'{bound}' is required for a range")
            value = entry[bound]
            if isinstance(value, str):
                try:
                    entry = {**entry, bound: float(value)}
                except ValueError:
                    raise SpecError(join(where, bound), f"expected a number, got {value!r}") from None
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(join(where, bound), f"expected a number, got {value!r}")
        kind = entry.get("type") or ("int" if declared is not None and declared.kind == "int" else "float")
        if kind not in ("int", "float"):
            raise SpecError(join(where, "type"), f"expected int or float, got {kind!r}")
        low, high, log = float(entry["low"]), float(entry["high"]), entry.get("log", False)
        if not isinstance(log, bool):  # the string 'false' is truthy
            raise SpecError(join(where, "log"), f"expected true or false, got {log!r}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SpecError(where, f"needs finite low < high, got low={low:g}, high={high:g}")
        if log and low <= 0:
            raise SpecError(join(where, "log"), f"a log range needs low > 0, got {low:g}")
        step = _step(entry.get("step"), log, kind, high - low, join(where, "step"))
        if declared is not None:
            _check_value(name, low, join(where, "low"), declared)
        return Dim(name, kind, low=low, high=high, log=log, step=step, condition=condition)
    if isinstance(entry, list):
        raise SpecError(where, "a list is ambiguous here: write {choices: [...]} to search over it")
    return Dim(name, "fixed", value=entry, condition=condition)


def _step(step: Any, log: bool, kind: str, width: float, where: str) -> float | None:
    """A range's ``step``: a positive number no wider than the range, never with ``log`` (Optuna refuses both)."""
    if step is None:
        return None
    if log:
        raise SpecError(where, "a range cannot have both step and log: true (Optuna samples one or the other)")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= width:
        raise SpecError(where, f"expected a number > 0 and <= high - low ({width:g}), got {step!r}")
    if kind == "int" and not float(step).is_integer():
        raise SpecError(where, f"an int range needs a whole step, got {step!r}")
    return step


def _check_value(name: str, value: Any, where: str, declared: Param | None) -> None:
    if declared is not None:
        try:
            declared.validate(value, where)
        except ValueError as err:
            raise SpecError(where, str(err).split(": ", 1)[-1]) from None
        check_declared_sign(declared, value, where)


def compile_space(
    data: Any, file: str, student_check: Any = None, registry: dict[str, Any] | None = None
) -> SearchSpace:
    """Validate a parsed space document and compile it.

    ``student_check(params)`` (optional) validates a student configuration
    with the given dotted-path values applied; it is called with the ends of
    each range and each choice so a typo in a path fails here, not in a trial.
    """
    known = KD_METHODS if registry is None else registry  # classification has its own methods
    if not isinstance(data, dict):
        raise SpecError("", f"a search space is a mapping with 'student' and/or 'methods', got {type(data).__name__}")
    unknown = set(data) - {"student", "methods"}
    if unknown:
        raise SpecError(sorted(unknown)[0], "unknown section; a search space has 'student' and 'methods'")
    dims: list[Dim] = []
    student = data.get("student") or {}
    if not isinstance(student, dict):
        raise SpecError("student", "expected a mapping of dotted student paths to ranges")
    for path, entry in student.items():
        where = join("student", str(path))
        dim = _dim_from_entry(f"student.{path}", entry, where, None, None)
        if student_check is not None:
            probes = (
                dim.choices if dim.kind == "choice" else (dim.value,) if dim.kind == "fixed" else (dim.low, dim.high)
            )
            for probe in probes:
                probe = int(probe) if dim.kind == "int" else probe
                try:
                    student_check({str(path): probe})
                except SpecError as err:
                    raise SpecError(where, f"value {probe!r} gives an invalid student: {err}") from None
        dims.append(dim)
    methods = data.get("methods") or {}
    if not isinstance(methods, dict):
        raise SpecError("methods", "expected a mapping of KD method names to their parameters")
    refuse_code(methods, "methods")
    for method, params in methods.items():
        where = join("methods", str(method))
        if method not in known:
            raise SpecError(where, f"unknown KD method; known: {', '.join(sorted(known))}")
        params = {} if params in (None, "default") else params
        if not isinstance(params, dict):
            raise SpecError(where, f"expected a mapping of parameters (or 'default'), got {params!r}")
        switch = f"methods.{method}"
        enabled = params.get(METHOD_SWITCH, [True, False])
        if enabled is True:
            dims.append(Dim(switch, "fixed", value=True))
        elif isinstance(enabled, list) and set(enabled) <= {True, False} and enabled:
            dims.append(Dim(switch, "choice", choices=tuple(enabled)))
        else:
            raise SpecError(join(where, METHOD_SWITCH), f"expected true or a list like [true, false], got {enabled!r}")
        declared = known[method].params
        names = list(declared) if params == {} else [p for p in params if p != METHOD_SWITCH]
        for pname in names:
            pwhere = join(where, pname)
            options = getattr(known[method], "options", {})
            if pname in options:  # a method's option is never searched: a fixed, validated value
                try:
                    value = resolve_options(known[method], {pname: params[pname]}, Path(file).parent)[pname]
                except SpecError as err:
                    raise err.within(where) from None
                dims.append(Dim(f"{switch}.{pname}", "fixed", value=value, condition=switch))
                continue
            if pname not in declared:
                raise SpecError(pwhere, f"unknown parameter of {method}; it has {', '.join(sorted(declared))}")
            entry = params.get(pname, "default")
            dim = _dim_from_entry(f"{switch}.{pname}", entry, pwhere, declared[pname], switch)
            for probe in dim.choices if dim.kind == "choice" else (dim.value,) if dim.kind == "fixed" else ():
                _check_value(pname, probe, pwhere, declared[pname])
            dims.append(dim)
    if not dims:
        raise SpecError("", "the search space is empty")
    return SearchSpace(dims, file, registry)


def load_space(path: str | Path, student_check: Any = None, registry: dict[str, Any] | None = None) -> SearchSpace:
    data, source = load_yaml(path)
    try:
        return compile_space(data, str(path), student_check, registry)
    except SpecError as err:
        raise source.error(err) from None


def split_params(params: dict[str, Any], base_methods: dict[str, dict[str, Any]] | None = None):
    """Flat trial parameters -> (student overrides by dotted path, enabled methods with their params)."""
    student: dict[str, Any] = {}
    methods: dict[str, dict[str, Any]] = copy.deepcopy(base_methods or {})
    switches = {k.split(".")[1]: v for k, v in params.items() if k.startswith("methods.") and k.count(".") == 1}
    for name, on in switches.items():
        if on:
            methods.setdefault(name, {})
        else:
            methods.pop(name, None)
    for key, value in params.items():
        if key.startswith("student."):
            student[key[len("student.") :]] = value
        elif key.startswith("methods.") and key.count(".") >= 2:
            _, name, pname = key.split(".", 2)
            if switches.get(name, True) and name in methods:
                methods[name][pname] = value
    return student, methods
