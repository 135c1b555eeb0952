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
method's defaults. Entries are validated when the space is loaded, by the space's pydantic model
(:func:`rkd.train.spec_schema.space_model`, the one ``rkd schema`` writes as JSON Schema): an
unknown method or parameter, a bad range or a value a method's parameter does not admit fails
with the file and line of the entry; a student path, with the spec's student (``student_check``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rkd.distill  # noqa: F401  (importing the package registers every method)
from rkd.distill.base import KD_METHODS, TASKS, Param, methods_of
from rkd.errors import SpecError
from rkd.train.space_schema import SpaceChoices, SpaceMethod, SpaceRange
from rkd.train.spec_errors import validated
from rkd.train.spec_schema import space_model
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
            return any(_same(value, c) for c in self.choices)
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

    def size_dims(self) -> list[Dim]:
        """The space's choices of the student's model (``student.model.*``: width, depth, input
        resolution, backbone, ...), which set its GFLOPs, the front's other axis."""
        return [d for d in self.dims if d.name.startswith("student.model.") and d.kind == "choice" and d.size() > 1]

    def span_sizes(self, points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        """``points`` (copied, all of which run), with the values of each size dim given, in order, to
        those that leave it to the sampler; where they are too few, partial points are added (up to
        ``limit`` points in all) until every value is tried once: the first value listed, the last,
        then those between, in the space's order.

        A multi-objective sampler's few random start-up trials may all land on one size (6 TPE trials
        on AID kept to 96 px and never tried 64, the size KD helps most: docs/benchmarks.md), and the
        front then misses the small students a FLOPs budget asks for. Values a point fixes count as
        tried; every other parameter stays with the sampler. Where choices run from small to large, as
        in the repository's spaces, the first free point is the smallest student, the next the largest
        (the no-KD reference keeps the spec's student: :func:`rkd.search.config.first_points`).
        """
        points = [dict(p) for p in points]
        values = {}
        for d in self.size_dims():
            ordered = [d.choices[0], d.choices[-1], *d.choices[1:-1]]
            values[d.name] = [v for i, v in enumerate(ordered) if not any(_same(v, u) for u in ordered[:i])]
        needed = max((len(v) for v in values.values()), default=0)
        points += [{} for _ in range(min(needed, limit) - len(points))]
        for name, ordered in values.items():
            left = [v for v in ordered if not any(name in p and _same(p[name], v) for p in points)]
            for point in points:
                if not left:
                    break
                if name not in point:
                    point[name] = left.pop(0)
        return points

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


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b)  # a choice of 1 is not a choice of True


def _dim(name: str, entry: Any, declared: Param | None, condition: str | None) -> Dim:
    """The dim of a validated entry (:func:`~rkd.train.spec_schema.space_model`)."""
    if isinstance(entry, SpaceRange):
        kind = entry.type or "float"
        return Dim(
            name, kind, low=entry.low, high=entry.high, log=bool(entry.log), step=entry.step, condition=condition
        )
    if isinstance(entry, SpaceChoices):
        return Dim(name, "choice", choices=tuple(entry.choices), condition=condition)
    if declared is not None and isinstance(entry, str) and entry == "default":
        if declared.kind in ("bool", "choice"):
            choices = (False, True) if declared.kind == "bool" else tuple(declared.choices)
            return Dim(name, "choice", choices=choices, condition=condition)
        return Dim(name, declared.kind, low=declared.low, high=declared.high, log=declared.log, condition=condition)
    return Dim(name, "fixed", value=entry, condition=condition)


def _task_of(registry: dict[str, Any] | None) -> str:
    """The task whose KD methods ``registry`` holds (detection's when None)."""
    if registry is None:
        return "detection"
    task = next((t for t in TASKS if methods_of(t) is registry), None)
    if task is None:
        raise ValueError("a search space's methods are those of a task (rkd.distill.base.methods_of)")
    return task


def _check_student(student_check: Any, dim: Dim, path: str) -> None:
    """Every value ``dim`` can give the student at ``path`` makes a valid student (a range: its ends)."""
    probes = dim.choices if dim.kind == "choice" else (dim.value,) if dim.kind == "fixed" else (dim.low, dim.high)
    for probe in probes:
        probe = int(probe) if dim.kind == "int" else probe
        try:
            student_check({path: probe})
        except SpecError as err:
            raise SpecError(f"student.{path}", f"value {probe!r} gives an invalid student: {err}") from None


def compile_space(
    data: Any, file: str, student_check: Any = None, registry: dict[str, Any] | None = None
) -> SearchSpace:
    """Validate a parsed space document and compile it.

    What a valid space is, its model says (:func:`~rkd.train.spec_schema.space_model`, with the
    checks of :mod:`rkd.train.space_schema`); this turns the validated entries into dims, in the
    file's order. ``student_check(params)`` (optional) validates a student configuration with the
    given dotted-path values applied; it is called with the ends of each range and each choice so
    a typo in a path fails here, not in a trial.
    """
    space = validated(space_model(_task_of(registry)), data, {"base_dir": Path(file).parent})
    known = KD_METHODS if registry is None else registry  # classification has its own methods
    dims: list[Dim] = []
    for path in data.get("student") or {}:
        dims.append(_dim(f"student.{path}", space.student[path], None, None))
        if student_check is not None:
            _check_student(student_check, dims[-1], str(path))
    for method, given in (data.get("methods") or {}).items():
        entry, declared = getattr(space.methods, method), known[method].params
        switch = f"methods.{method}"
        enabled = entry.enabled if isinstance(entry, SpaceMethod) and entry.enabled is not None else [True, False]
        dims.append(
            Dim(switch, "fixed", value=True) if enabled is True else Dim(switch, "choice", choices=tuple(enabled))
        )
        # no parameters named: the method's declared ones, each over its declared range
        names = [p for p in given if p != METHOD_SWITCH] if isinstance(given, dict) and given else list(declared)
        for pname in names:
            value = getattr(entry, pname) if isinstance(entry, SpaceMethod) else "default"
            dims.append(_dim(f"{switch}.{pname}", value, declared.get(pname), switch))
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
