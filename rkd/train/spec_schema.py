"""Pydantic models of the run spec and of a search-space file: their structure written once.

They serve twice: :func:`~rkd.train.spec_errors.check_structure` runs the spec's model when a
spec is loaded (unknown keys, wrong types, missing sections; errors in rkd's ``path: message``
form), :func:`rkd.search.space.compile_space` runs the space's model (its parts and their checks
of ranges, values and options are in :mod:`rkd.train.space_schema`), and
``rkd schema`` writes their JSON Schema (:func:`spec_json_schema`, :func:`space_json_schema`)
so editors validate and complete spec files. The training settings take their defaults from
:class:`~rkd.train.config.TrainConfig`; a KD method's entry is generated from the parameters its
class declares (:class:`~rkd.distill.base.Param`, :class:`~rkd.distill.base.Option`), so a
method's parameters have one source. What needs more than the structure (paths exist, model
kinds, ranges, a method's options) stays with the code in :mod:`rkd.train.spec`.
"""

# Optional[...] / Union[...] here are also built at run time for create_model; kept in one spelling.
# ruff: noqa: UP007, UP045

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, create_model

import rkd.distill  # noqa: F401  (importing the package registers every method)
from rkd.atomic import atomic_write_json
from rkd.distill.balance import BALANCE_DEFAULTS, BALANCE_MODES
from rkd.distill.base import METHOD_LABELS, Param, methods_of
from rkd.distill.base import TASKS as METHOD_TASKS
from rkd.train.config import TEACHER_CACHE_DEFAULTS, train_default
from rkd.train.space_schema import SpaceFile, SpaceMethod, declared_entry
from rkd.train.spec_errors import Closed

DEFAULT = Literal["default"]  # "default" stands for a parameter's declared default (Param.resolve)


def _setting(name: str, description: str) -> Any:
    """A training setting whose default is :class:`TrainConfig`'s."""
    return Field(default=train_default(name), description=description)


class Logging(Closed):
    tensorboard: bool = Field(False, description="write TensorBoard event files (needs tensorboardX)")
    mlflow: bool = Field(False, description="log to MLflow (needs mlflow)")


class KDBalance(Closed):
    """How the KD losses are scaled against the task loss (rkd.distill.balance)."""

    mode: Literal[tuple(BALANCE_MODES)] = Field(
        BALANCE_DEFAULTS["mode"],
        description="auto: scale the KD losses to ratio x the task loss; off: the methods' weights as given",
    )
    ratio: float = Field(BALANCE_DEFAULTS["ratio"], description="KD loss / task loss after balancing")
    steps: int = Field(BALANCE_DEFAULTS["steps"], description="steps measured before scaling")
    every: int = Field(BALANCE_DEFAULTS["every"], description="re-measure every this many epochs (0: once)")


class Training(Closed):
    """How one model is trained (the settings shared by teacher and student)."""

    model: dict[str, Any] = Field(
        description="the network: kind (retinanet, fcos, faster_rcnn, classifier, openmmlab), backbone, neck, head"
    )
    epochs: int | None = Field(None, description="training epochs (0 for an openmmlab teacher with its own checkpoint)")
    batch_size: int | None = Field(None, description="images per step")
    lr: float | None = Field(None, description="peak learning rate (> 0)")
    weight_decay: float = _setting("weight_decay", "AdamW weight decay")
    warmup_epochs: float = _setting("warmup_epochs", "linear warm-up, in epochs")
    eval_every: int = _setting("eval_every", "evaluate every this many epochs (0: after the last only)")
    grad_clip: float = _setting("grad_clip", "gradient norm clip (0: none)")
    precision: Literal["auto", "fp32", "bf16"] = _setting("precision", "auto: bf16 autocast on CUDA, fp32 on CPU")
    schedule: Literal["cosine", "step"] = _setting(
        "schedule", "after the warm-up: cosine decay, or steps at step_epochs"
    )
    step_epochs: list[int] = _setting("step_epochs", "epochs where the lr drops (schedule: step)")
    step_gamma: float = _setting("step_gamma", "lr factor at each step epoch")
    lr_reference_batch: int | None = _setting(
        "lr_reference_batch", "lr is for this many images per step (scaled to the real batch)"
    )
    channels_last: Literal["auto", True, False] = _setting(
        "channels_last", "channels-last memory format (auto: on CUDA only)"
    )
    keep: int = _setting("keep", "checkpoints kept: 0 the last two, k the k best by val mAP50")
    logging: Logging = Field(default_factory=Logging, description="experiment loggers")


def _param_type(param: Param) -> Any:
    """The values a spec may give a declared parameter: its type, or the word ``default``."""
    if param.kind == "choice":
        return Union[Literal[tuple(param.choices)], DEFAULT]
    return Union[{"float": float, "int": int, "bool": bool}[param.kind], DEFAULT]


def _method_fields(cls: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, param in cls.params.items():
        fields[name] = (
            Optional[_param_type(param)],
            Field(None, description=f"{param.help or param.kind} (default {param.default!r})"),
        )
    for name, option in cls.options.items():
        fields[name] = (Any, Field(None, description=f"{option.help or 'option'} (not searched)"))
    return fields


@cache
def methods_model(task: str | None) -> type[BaseModel]:
    """The ``methods:`` mapping of a student: one optional entry per KD method of ``task``, its
    parameters those the method declares; ``task=None``: every task's methods (a method of both
    tasks takes the parameters of either, since a schema file does not know the spec's task)."""
    tasks = METHOD_TASKS if task is None else (task,)
    merged: dict[str, dict[str, Any]] = {}
    for t in tasks:
        for name, cls in methods_of(t).items():
            for pname, field in _method_fields(cls).items():
                known = merged.setdefault(name, {})
                known[pname] = field if pname not in known or known[pname][0] == field[0] else (Any, field[1])
    entries = {
        name: (
            Optional[create_model(f"Method_{task or 'any'}_{name}", __base__=Closed, **fields)],
            Field(None, description=f"the KD method {name}"),
        )
        for name, fields in merged.items()
    }
    return create_model(f"Methods_{task or 'any'}", __base__=Closed, **entries)


class Teacher(Training):
    checkpoint: str | None = Field(None, description="weights of a teacher trained elsewhere (then not trained here)")
    min_map: float | None = Field(None, description="refuse to distil from a teacher below this val mAP50")
    cache: Literal["auto", "off"] | bool | None = Field(
        None, description="auto (default): keep the teacher's outputs per input and reuse them in every trial; off"
    )
    cache_gb: float | None = Field(
        None,
        description=f"the most disk the kept teacher outputs may take (default {TEACHER_CACHE_DEFAULTS['limit_gb']:g})",
    )


@cache
def student_model(task: str | None) -> type[BaseModel]:
    return create_model(
        f"Student_{task or 'any'}",
        __base__=Training,
        methods=(Optional[methods_model(task)], Field(None, description="KD methods and their parameters")),
        kd_balance=(Optional[KDBalance], Field(None, description="how KD losses are scaled against the task loss")),
    )


class Resources(Closed):
    workers: int | None = Field(None, description="Ray Train workers per trial")
    cpus_per_worker: int | None = Field(None, description="CPUs per worker")
    gpus_per_worker: float | None = Field(None, description="GPUs per worker (fractions share a GPU)")
    max_concurrent_trials: int | None = Field(None, description="trials run at once")
    ray_address: str | None = Field(None, description="a Ray cluster to join (absent: an embedded local Ray)")


class Scheduler(Closed):
    kind: Literal["asha"] | None = None
    grace_period: int | None = Field(None, description="epochs before a trial can be stopped")
    reduction_factor: float | None = None


class Stop(Closed):
    after_epochs: int = Field(description="check after this many epochs")
    below_map: float = Field(description="stop a trial whose val mAP50 is below this")


class Confirm(Closed):
    top: int = Field(description="front points retrained, each with its no-KD twin, with more seeds (>= 1)")
    seeds: int = Field(description="seeds per confirmed point (>= 2)")


class Search(Closed):
    space: str = Field(description="the search-space file, relative to the spec")
    trials: int | None = None
    seed: int | None = None
    sampler: Literal["tpe", "nsga2", "gp", "random"] | None = None
    objectives: list[str] | None = Field(
        None, description="the task's accuracy (map50 or top1) and gflops, optionally latency_ms"
    )
    max_gflops: float | None = None
    initial_points: list[dict[str, Any]] | None = Field(None, description="configurations tried first")
    published_defaults: bool | None = Field(None, description="also try each method alone at its published defaults")
    scheduler: Scheduler | None = None
    stop: Stop | None = None
    confirm: Confirm | None = None


@cache
def spec_model(task: str | None = None) -> type[BaseModel]:
    """The run spec of ``task`` (``None``: of any task, for the JSON Schema)."""
    return create_model(
        "RunSpec",
        __base__=Closed,
        __doc__="An rkd run spec: data, teacher, student, search and resources.",
        name=(Optional[str], Field(None, description="the run's folder name (default: the file's stem)")),
        task=(Optional[Literal[tuple(METHOD_TASKS)]], Field(None, description="detection (default) or classification")),
        data=(dict[str, Any], Field(description="the data set: format, root, classes, input_size, ...")),
        teacher=(Teacher, Field(description="the teacher and how it is trained")),
        student=(student_model(task), Field(description="the student, its training and its KD methods")),
        resources=(Optional[Resources], None),
        search=(Optional[Search], None),
        output_dir=(Optional[str], Field(None, description="local folder or storage URI of runs (default ./runs)")),
        seed=(Optional[int], None),
    )


# A search-space file (rkd.search.space): searched or fixed values of student settings and KD methods.
# Its model is what a valid space file is: its entries' shapes and checks are in rkd.train.space_schema.


@cache
def space_model(task: str | None = None) -> type[BaseModel]:
    """A search-space file of ``task`` (``None``: of any task, for the JSON Schema): ``student``
    (dotted student paths) and ``methods`` (per method, ``enabled`` and its declared parameters)."""
    tasks = METHOD_TASKS if task is None else (task,)
    methods: dict[str, Any] = {}
    for name, fields in methods_model(task).model_fields.items():
        component = next(methods_of(t)[name] for t in tasks if name in methods_of(t))
        described = fields.annotation.__args__[0].model_fields  # Optional[Method_x]: its descriptions
        params = {
            p: (
                declared_entry(component.params[p]) if p in component.params else Any,
                Field(None, description=f.description),
            )
            for p, f in described.items()
        }
        model = create_model(f"SpaceMethod_{name}", __base__=SpaceMethod, **params)
        model.component, model.key_noun = component, f"parameter of {name}"
        methods[name] = (Optional[model | DEFAULT], None)
    entries = create_model("SpaceMethods", __base__=Closed, **methods)
    entries.key_noun, entries.keys_lead = METHOD_LABELS[task or "detection"], "known:"
    model = create_model(
        "SearchSpace",
        __base__=SpaceFile,
        methods=(Optional[entries], Field(None, description="KD methods the search may switch on")),
    )
    model.student_settings = tuple(student_model(task).model_fields)
    return model


def spec_json_schema() -> dict[str, Any]:
    """The spec's schema; ``student.methods`` are those of the spec's ``task`` (an if/then/else on
    ``task``: a detection method in a classification spec is refused, and the other way round)."""
    schemas = {task: spec_model(task).model_json_schema() for task in METHOD_TASKS}
    schema = schemas["detection"]
    for other in schemas.values():
        for name, definition in other.get("$defs", {}).items():
            if schema["$defs"].setdefault(name, definition) != definition:
                raise AssertionError(f"JSON Schema definition {name!r} differs between tasks")  # a naming slip
    student = {task: other["properties"]["student"] for task, other in schemas.items()}
    schema["properties"]["student"] = {"description": student["detection"].get("description", "")}
    schema["if"] = {"properties": {"task": {"const": "classification"}}, "required": ["task"]}
    schema["then"] = {"properties": {"student": student["classification"]}}
    schema["else"] = {"properties": {"student": student["detection"]}}
    return _draft_2020(schema, "rkd-spec")


def space_json_schema() -> dict[str, Any]:
    return _draft_2020(space_model().model_json_schema(), "rkd-space")


def _draft_2020(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{name}.schema.json", **schema}


SCHEMA_FILES = {"rkd-spec.schema.json": spec_json_schema, "rkd-space.schema.json": space_json_schema}


def write_schemas(out_dir: Path) -> list[Path]:
    """Write both JSON Schemas into ``out_dir`` (atomically: an editor never reads half a file)."""
    written = []
    for name, make in SCHEMA_FILES.items():
        atomic_write_json(out_dir / name, make())
        written.append(out_dir / name)
    return written
