"""The run spec: what to train on, the teacher, the student's base configuration, resources.

A spec is one YAML file. Relative paths in it are resolved against the file's
folder. Validation collects nothing lazily: every entry is checked before any
training starts, and an error names the entry (``student.model.backbone.width``)
with its file and line.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkd import storage
from rkd.distill.balance import BALANCE_DEFAULTS, BALANCE_MODES
from rkd.errors import RkdError, SpecError
from rkd.models import validate_model_spec
from rkd.models.factory import backbone_keys
from rkd.schema import Section, join, refuse_code, set_dotted
from rkd.train import spec_schema
from rkd.train.config import TEACHER_CACHE_DEFAULTS, TrainConfig, train_default
from rkd.train.spec_errors import check_structure
from rkd.train.tasks import TASKS
from rkd.yamlio import SourceMap, load_yaml

# Settings of the training loop beyond the basics (issue 7); see _loop_options.
# The keys of each role's section, from its pydantic model (rkd.train.spec_schema), which checks them.
TRAIN_KEYS = frozenset(spec_schema.Training.model_fields)
TEACHER_KEYS = frozenset(spec_schema.Teacher.model_fields)
STUDENT_KEYS = frozenset(spec_schema.student_model("detection").model_fields)


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 1
    ray_address: str | None = None  # None: an embedded local Ray


@dataclass
class RunSpec:
    name: str
    spec_path: Path
    data: dict[str, Any]
    teacher: TrainConfig
    teacher_checkpoint: Path | None
    min_map: float
    student: TrainConfig
    resources: Resources
    output_dir: Path
    seed: int
    search: dict[str, Any]
    source: SourceMap
    task: str = "detection"  # or "classification" (rkd.train.tasks)
    # teacher.cache / cache_gb: the teacher-output cache of the student stage (rkd.train.teacher_outputs)
    teacher_cache: dict[str, Any] = field(default_factory=lambda: dict(TEACHER_CACHE_DEFAULTS))
    # When `output_dir` is a storage URI (s3://, gs://, ...): that URI; output_dir is then
    # this node's local mirror of it (rkd.storage).
    output_uri: str | None = None

    @property
    def run_dir(self) -> Path:
        """The run folder on this node (the local mirror when the output is a URI)."""
        return self.output_dir / self.name

    @property
    def run_uri(self) -> str | None:
        """The run folder on shared storage, or None when ``output_dir`` is a local path."""
        return storage.join(self.output_uri, self.name) if self.output_uri else None

    @property
    def ray_storage(self) -> str:
        """Where Ray Train/Tune keep this run's checkpoints and state (reachable from every node)."""
        return storage.join(self.run_uri, "ray") if self.run_uri else str(self.run_dir / "ray")


def _resolve_openmmlab_paths(model: dict[str, Any], sec: Section, base: Path) -> dict[str, Any]:
    """``config`` and ``checkpoint`` of an openmmlab model, relative to the spec, checked to exist."""
    model = dict(model)
    for key in ("config", "checkpoint"):
        if model.get(key) is not None:
            model[key] = str(sec.file_path(key, base))
    return model


def _role_model(allowed: frozenset[str], task: str) -> type:
    """The pydantic model of the section whose keys are ``allowed`` (a student's, a teacher's, or the shared ones)."""
    if allowed == STUDENT_KEYS:
        return spec_schema.student_model(task)
    return spec_schema.Teacher if allowed == TEACHER_KEYS else spec_schema.Training


def _train_config(
    sec: Section, allowed: frozenset[str], defaults: dict[str, Any], base: Path | None = None, task: str = "detection"
) -> TrainConfig:
    try:  # unknown keys, wrong types: by the role's pydantic model
        check_structure(_role_model(allowed, task), sec.data)
    except SpecError as err:
        raise err.within(sec.path) from None
    try:
        model = validate_model_spec(sec.raw("model"))
    except SpecError as err:
        raise err.within(sec.where("model")) from None
    wrong_kind = TASKS[task].check_model_kind(model["kind"])
    if wrong_kind:
        raise SpecError(join(sec.where("model"), "kind"), wrong_kind)
    if model["kind"] == "openmmlab":
        model = _resolve_openmmlab_paths(model, sec.section("model"), base or Path.cwd())
    # epochs: 0 keeps a loaded model's own weights (an OpenMMLab teacher trained elsewhere)
    weights_given = model["kind"] == "openmmlab" and model.get("checkpoint") is not None
    epochs = sec.int("epochs", defaults["epochs"], low=0 if weights_given and "methods" not in allowed else 1)
    methods: dict[str, dict[str, Any]] = {}
    if "methods" in allowed and sec.raw("methods", None) is not None:
        try:
            methods = TASKS[task].validate_methods(sec.raw("methods"), base)  # base: for relative paths in options
        except SpecError as err:
            raise err.within(sec.where("methods")) from None
    return TrainConfig(
        model=model,
        epochs=epochs,
        batch_size=sec.int("batch_size", 8, low=1),
        lr=sec.float("lr", defaults["lr"], above=0.0),
        weight_decay=sec.float("weight_decay", train_default("weight_decay"), low=0.0),
        warmup_epochs=sec.float("warmup_epochs", train_default("warmup_epochs"), low=0.0),
        eval_every=sec.int("eval_every", train_default("eval_every"), low=0),
        grad_clip=sec.float("grad_clip", train_default("grad_clip"), low=0.0),
        methods=methods,
        **({"kd_balance": _kd_balance(sec.section("kd_balance"))} if "kd_balance" in allowed else {}),
        **_loop_options(sec),
    )


def _kd_balance(sec: Section) -> dict[str, Any]:
    """The student's ``kd_balance`` section with its defaults (see :mod:`rkd.distill.balance`)."""
    return {
        "mode": sec.str("mode", BALANCE_DEFAULTS["mode"], choices=list(BALANCE_MODES)),
        "ratio": sec.float("ratio", BALANCE_DEFAULTS["ratio"], low=1e-6, high=1e6),
        "steps": sec.int("steps", BALANCE_DEFAULTS["steps"], low=1),
        "every": sec.int("every", BALANCE_DEFAULTS["every"], low=0),
    }


LOGGERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}  # logger -> the package it needs


def _loop_options(sec: Section) -> dict[str, Any]:
    """The loop settings of issue 7, validated; absent entries keep the behaviour of older specs."""
    schedule = sec.str("schedule", train_default("schedule"), choices=["cosine", "step"])
    step_epochs = sec.raw("step_epochs", train_default("step_epochs"))
    if not isinstance(step_epochs, list) or any(
        isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in step_epochs
    ):
        raise SpecError(sec.where("step_epochs"), f"expected a list of epoch numbers >= 1, got {step_epochs!r}")
    if step_epochs != sorted(set(step_epochs)):
        raise SpecError(sec.where("step_epochs"), f"expected increasing epoch numbers, got {step_epochs!r}")
    if schedule == "step" and not step_epochs:
        raise SpecError(sec.where("step_epochs"), "is required with schedule: step (the epochs where lr drops)")
    reference = sec.int("lr_reference_batch", None, low=1) if sec.raw("lr_reference_batch", None) is not None else None
    channels_last = sec.raw("channels_last", train_default("channels_last"))
    if channels_last != "auto" and not isinstance(channels_last, bool):
        raise SpecError(sec.where("channels_last"), f"expected auto, true or false, got {channels_last!r}")
    return {
        "precision": sec.str("precision", train_default("precision"), choices=["auto", "fp32", "bf16"]),
        "schedule": schedule,
        "step_epochs": list(step_epochs),
        "step_gamma": sec.float("step_gamma", train_default("step_gamma"), low=0.0, high=1.0),
        "lr_reference_batch": reference,
        "channels_last": channels_last,
        "keep": sec.int("keep", train_default("keep"), low=0),
        "logging": _logging_options(sec.section("logging")),
    }


def _logging_options(sec: Section) -> dict[str, bool]:
    chosen = {name: sec.bool(name, False) for name in sorted(LOGGERS)}
    for name, on in chosen.items():
        if on and importlib.util.find_spec(LOGGERS[name]) is None:
            raise SpecError(sec.where(name), f"needs the '{LOGGERS[name]}' package, which is not installed")
    return {name: on for name, on in chosen.items() if on}


def with_overrides(
    base: TrainConfig,
    overrides: dict[str, Any],
    methods: dict[str, dict[str, Any]] | None = None,
    task: str = "detection",
) -> TrainConfig:
    """``base`` with dotted-path ``overrides`` (and ``methods``) applied, validated again."""
    d = base.to_dict()
    new_backbone = overrides.get("model.backbone.name")
    if new_backbone is not None and new_backbone != d["model"]["backbone"].get("name"):
        # Another backbone family: keep only the settings it shares (width, pretrained, ...);
        # the old one's own keys (convnet's depth) and its weights file do not carry over.
        keep = backbone_keys(new_backbone) - {"weights"}
        d["model"]["backbone"] = {k: v for k, v in d["model"]["backbone"].items() if k in keep}
    for path, value in overrides.items():
        set_dotted(d, path, value)
    if methods is not None:
        d["methods"] = methods
    return _train_config(Section(d, "student"), STUDENT_KEYS, {"epochs": base.epochs, "lr": base.lr}, task=task)


def parse_spec(data: Any, spec_path: Path, source: SourceMap) -> RunSpec:
    root = Section(data, "")
    refuse_code(data, "")  # before the methods' validation imports it; workers revalidate what passed here
    base = spec_path.parent
    name = root.str("name", spec_path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not name.strip("."):
        # '.' and '..' would put the run in output_dir itself or in its parent (and --fresh would delete there)
        raise SpecError(
            "name", f"one plain folder name: letters, digits, '.', '_' or '-', not '.' or '..'; got {name!r}"
        )

    task = root.str("task", "detection", choices=list(TASKS))
    check_structure(spec_schema.spec_model(task), data)  # unknown keys and wrong types, by the spec's pydantic model
    data_sec = root.section("data", required=True)
    data_dict = dict(data_sec.data)
    if data_dict.get("root") is not None:
        data_dict["root"] = str(data_sec.file_path("root", base, must_exist=False))
    try:
        data_spec = TASKS[task].validate_data(data_dict)
    except SpecError as err:
        raise err.within("data") from None

    teacher_sec = root.section("teacher", required=True)
    teacher = _train_config(teacher_sec, TEACHER_KEYS, {"epochs": 12, "lr": 2e-3}, base, task=task)
    checkpoint = teacher_sec.file_path("checkpoint", base, default=None)
    student = _train_config(root.section("student", required=True), STUDENT_KEYS, {"epochs": 6, "lr": 2e-3}, base, task)

    res = root.section("resources")
    resources = Resources(
        workers=res.int("workers", 1, low=1),
        cpus_per_worker=res.int("cpus_per_worker", 1, low=1),
        gpus_per_worker=res.float("gpus_per_worker", 0.0, low=0.0),
        max_concurrent_trials=res.int("max_concurrent_trials", 1, low=1),
        ray_address=res.str("ray_address", None) if res.raw("ray_address", None) is not None else None,
    )
    search = root.raw("search", {})
    if not isinstance(search, dict):
        raise SpecError("search", f"expected a mapping, got {search!r}")
    output_dir, output_uri = _output_location(root, base)
    return RunSpec(
        name=name,
        spec_path=spec_path,
        data=data_spec,
        teacher=teacher,
        teacher_checkpoint=checkpoint,
        min_map=teacher_sec.float("min_map", 0.0, low=0.0, high=1.0),
        student=student,
        resources=resources,
        output_dir=output_dir,
        seed=root.int("seed", 0, low=0),
        search=search,
        source=source,
        task=task,
        output_uri=output_uri,
        teacher_cache=_teacher_cache(teacher_sec),
    )


def _teacher_cache(sec: Section) -> dict[str, Any]:
    mode = sec.raw("cache", TEACHER_CACHE_DEFAULTS["mode"])
    if isinstance(mode, bool):  # YAML 1.1 reads off as false
        mode = "auto" if mode else "off"
    if mode not in ("auto", "off"):
        raise SpecError("cache", f"expected auto or off, got {mode!r}").within("teacher")
    return {"mode": mode, "limit_gb": sec.float("cache_gb", TEACHER_CACHE_DEFAULTS["limit_gb"], low=0.0)}


def _output_location(root: Section, base: Path) -> tuple[Path, str | None]:
    """``(local run root, storage URI or None)`` from ``output_dir`` (default ``./runs``)."""
    raw = root.raw("output_dir", None)
    if isinstance(raw, str) and storage.is_uri(raw):
        try:
            storage.resolve(raw)
        except RkdError as err:
            raise SpecError(root.where("output_dir"), str(err)) from None
        return storage.mirror_dir(raw), raw
    if raw is None:
        return Path.cwd() / "runs", None
    return root.file_path("output_dir", base, must_exist=False), None


def load_spec(path: str | Path) -> RunSpec:
    """Read and validate a spec file; errors carry the file and the entry's line."""
    path = Path(path).resolve()
    data, source = load_yaml(path)
    try:
        return parse_spec(data, path, source)
    except SpecError as err:
        raise source.error(err) from None
