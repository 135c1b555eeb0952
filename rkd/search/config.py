"""The ``search:`` section of a spec, read and checked, and the space and first points it names.

:class:`SearchConfig` is the section parsed (:func:`parse_search`); :func:`load_search_space`
compiles its space against the spec's student; :func:`reference_points` and :func:`first_points`
are the configurations a search tries before its sampler's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkd.errors import SpecError
from rkd.schema import Section, get_dotted, join
from rkd.search.confirm import parse_confirm
from rkd.search.results import NO_KD
from rkd.search.space import SearchSpace, load_space
from rkd.train import spec_schema
from rkd.train.spec import RunSpec, with_overrides
from rkd.train.spec_errors import check_structure
from rkd.train.tasks import TASKS

SEARCH_KEYS = frozenset(spec_schema.Search.model_fields)  # checked by that model
SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass
class SearchConfig:
    space_path: Path
    trials: int
    seed: int
    sampler: str
    objectives: tuple[str, ...]  # the task's accuracy (map50 or top1) and gflops, optionally latency_ms
    max_gflops: float | None
    initial_points: list[dict[str, Any]]
    published_defaults: bool  # also try each method of the space alone at its published defaults
    scheduler: dict[str, Any] | None  # {kind: asha, grace_period, reduction_factor}
    stop: dict[str, Any] | None  # {after_epochs, below_map}
    confirm: dict[str, int] | None = None  # {top, seeds}: see rkd.search.confirm


def parse_search(spec: RunSpec) -> SearchConfig:
    sec = Section(spec.search, "search")
    try:
        try:  # unknown keys and wrong types, by the section's pydantic model (again: the CLI may have set trials)
            check_structure(spec_schema.Search, spec.search)
        except SpecError as err:
            raise err.within("search") from None
        return SearchConfig(
            space_path=sec.file_path("space", spec.spec_path.parent),
            trials=sec.int("trials", 8, low=1),
            seed=sec.int("seed", spec.seed, low=0),
            sampler=sec.str("sampler", "tpe", choices=list(SAMPLERS)),
            objectives=_objectives(sec, TASKS[spec.task].metric),
            max_gflops=sec.float("max_gflops", None, low=0.0) if sec.raw("max_gflops", None) is not None else None,
            initial_points=sec.raw("initial_points", []),
            published_defaults=sec.bool("published_defaults", False),
            scheduler=_scheduler(sec.section("scheduler")) if sec.raw("scheduler", None) is not None else None,
            stop=_stop(sec.section("stop")) if sec.raw("stop", None) is not None else None,
            confirm=parse_confirm(sec.section("confirm")) if sec.raw("confirm", None) is not None else None,
        )
    except SpecError as err:
        raise spec.source.error(err) from None


def _objectives(sec: Section, accuracy: str) -> tuple[str, ...]:
    given = sec.raw("objectives", [accuracy, "gflops"])
    if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
        raise SpecError(join(sec.path, "objectives"), f"expected a list of objective names, got {given!r}")
    if len(set(given)) != len(given) or not {accuracy, "gflops"} <= set(given) <= {accuracy, "gflops", "latency_ms"}:
        raise SpecError(
            join(sec.path, "objectives"),
            f"expected {accuracy} and gflops, optionally latency_ms, each once; got {given!r}",
        )
    return (accuracy, *[o for o in given if o != accuracy])  # the accuracy first: the front's y axis


def _scheduler(sec: Section) -> dict[str, Any]:
    return {
        "kind": sec.str("kind", "asha", choices=["asha"]),
        "grace_period": sec.int("grace_period", 1, low=1),
        "reduction_factor": sec.float("reduction_factor", 2.0, low=1.01),
    }


def _stop(sec: Section) -> dict[str, Any]:
    return {"after_epochs": sec.int("after_epochs", low=1), "below_map": sec.float("below_map", low=0.0, high=1.0)}


def load_search_space(spec: RunSpec, search: SearchConfig) -> SearchSpace:
    """Compile the space, checking every student value it can produce against the spec."""
    space = load_space(
        search.space_path,
        student_check=lambda overrides: with_overrides(spec.student, overrides, task=spec.task),
        registry=TASKS[spec.task].method_registry(),
    )
    if search.published_defaults:
        space = space.with_published_choices()  # the published points run the published configuration as it is
    if not isinstance(search.initial_points, list):
        raise spec.source.error(SpecError("search.initial_points", "expected a list of {parameter: value} mappings"))
    dims = {d.name: d for d in space.dims}
    for i, point in enumerate(search.initial_points):
        where = f"search.initial_points.{i}"
        if not isinstance(point, dict):
            raise spec.source.error(SpecError(where, f"expected a mapping of parameter names to values, got {point!r}"))
        for key, value in point.items():
            if key not in dims:
                raise spec.source.error(
                    SpecError(f"{where}.{key}", f"not a parameter of the space; it has {sorted(dims)}")
                )
            if not dims[key].admits(value):  # Optuna would fail on it after the teacher stage
                raise spec.source.error(
                    SpecError(
                        f"{where}.{key}",
                        f"{value!r} is outside the space's {dims[key].describe()} ({search.space_path.name})",
                    )
                )
    return space


def reference_points(space: SearchSpace, search: SearchConfig) -> dict[str, dict[str, Any]]:
    """Named configurations every user wants to compare with: the student without KD and, with
    ``published_defaults``, each method of the space alone at its published defaults."""
    points = {NO_KD: space.baseline_point()} if space.baseline_point() else {}
    if search.published_defaults:
        points.update({f"{m} defaults": p for m, p in space.published_default_points().items()})
    return points


def first_points(space: SearchSpace, search: SearchConfig, student: Any = None) -> list[dict[str, Any]] | None:
    """Configurations tried first: the user's, else the reference points; with every value of the
    student's size choices among them (:meth:`~rkd.search.space.SearchSpace.span_sizes`).

    ``student`` (the spec's ``TrainConfig``): the no-KD reference keeps its size where the space
    lists that value, so "the student without KD" is the student the spec describes.
    """
    if search.initial_points:
        points = [dict(p) for p in search.initial_points]
        if search.published_defaults:
            points += list(reference_points(space, search).values())[1:]
    else:
        points = list(reference_points(space, search).values())
        if points and student is not None:  # points[0] is the no-KD reference
            points[0] = {**points[0], **spec_sizes(space, student)}
    # The first trials span the student's sizes: the points that run take them first, and points
    # are added for the rest up to half the trials.
    points = space.span_sizes(points[: search.trials], limit=-(-search.trials // 2))
    return points[: search.trials] or None


def spec_sizes(space: SearchSpace, student: Any) -> dict[str, Any]:
    """The spec's student's value of each size dim of ``space`` that lists it."""
    found = {}
    for d in space.size_dims():
        value = get_dotted(student.model, d.name.removeprefix("student.model."))
        if d.admits(value):
            found[d.name] = value
    return found
