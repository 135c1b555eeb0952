"""The run spec: what to train on, the teacher, the student's base configuration, resources.

A spec is one YAML file. Relative paths in it are resolved against the file's
folder. Validation collects nothing lazily: every entry is checked before any
training starts, and an error names the entry (``student.model.backbone.width``)
with its file and line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkd.data.dataset import validate_data_spec
from rkd.distill.distiller import validate_methods
from rkd.errors import SpecError
from rkd.models import validate_model_spec
from rkd.schema import Section, set_dotted
from rkd.yamlio import SourceMap, load_yaml

TOP_LEVEL_KEYS = {"name", "data", "teacher", "student", "resources", "search", "output_dir", "seed"}
TRAIN_KEYS = {"model", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "eval_every", "grad_clip"}
TEACHER_KEYS = TRAIN_KEYS | {"checkpoint", "min_map"}
STUDENT_KEYS = TRAIN_KEYS | {"methods"}
RESOURCE_KEYS = {"workers", "cpus_per_worker", "gpus_per_worker", "max_concurrent_trials", "ray_address"}


@dataclass
class TrainConfig:
    """How one model is trained (teacher, or a student with KD methods)."""

    model: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    eval_every: int = 0  # 0: evaluate after the last epoch only
    grad_clip: float = 10.0
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


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

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def _train_config(sec: Section, allowed: set[str], defaults: dict[str, Any]) -> TrainConfig:
    sec.reject_unknown(allowed)
    try:
        model = validate_model_spec(sec.raw("model"))
    except SpecError as err:
        raise err.within(sec.where("model")) from None
    methods: dict[str, dict[str, Any]] = {}
    if "methods" in allowed and sec.raw("methods", None) is not None:
        try:
            methods = validate_methods(sec.raw("methods"))
        except SpecError as err:
            raise err.within(sec.where("methods")) from None
    return TrainConfig(
        model=model,
        epochs=sec.int("epochs", defaults["epochs"], low=1),
        batch_size=sec.int("batch_size", 8, low=1),
        lr=sec.float("lr", defaults["lr"], low=0.0),
        weight_decay=sec.float("weight_decay", 1e-4, low=0.0),
        warmup_epochs=sec.float("warmup_epochs", 1.0, low=0.0),
        eval_every=sec.int("eval_every", 0, low=0),
        grad_clip=sec.float("grad_clip", 10.0, low=0.0),
        methods=methods,
    )


def with_overrides(
    base: TrainConfig, overrides: dict[str, Any], methods: dict[str, dict[str, Any]] | None = None
) -> TrainConfig:
    """``base`` with dotted-path ``overrides`` (and ``methods``) applied, validated again."""
    d = base.to_dict()
    for path, value in overrides.items():
        set_dotted(d, path, value)
    if methods is not None:
        d["methods"] = methods
    return _train_config(Section(d, "student"), STUDENT_KEYS, {"epochs": base.epochs, "lr": base.lr})


def parse_spec(data: Any, spec_path: Path, source: SourceMap) -> RunSpec:
    root = Section(data, "")
    root.reject_unknown(TOP_LEVEL_KEYS)
    base = spec_path.parent
    name = root.str("name", spec_path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SpecError("name", f"use letters, digits, '.', '_' or '-' only (it names a folder), got {name!r}")

    data_sec = root.section("data", required=True)
    data_dict = dict(data_sec.data)
    if data_dict.get("root") is not None:
        data_dict["root"] = str(data_sec.file_path("root", base, must_exist=False))
    try:
        data_spec = validate_data_spec(data_dict)
    except SpecError as err:
        raise err.within("data") from None

    teacher_sec = root.section("teacher", required=True)
    teacher = _train_config(teacher_sec, TEACHER_KEYS, {"epochs": 12, "lr": 2e-3})
    checkpoint = teacher_sec.file_path("checkpoint", base, default=None)
    student = _train_config(root.section("student", required=True), STUDENT_KEYS, {"epochs": 6, "lr": 2e-3})

    res = root.section("resources")
    res.reject_unknown(RESOURCE_KEYS)
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
    return RunSpec(
        name=name,
        spec_path=spec_path,
        data=data_spec,
        teacher=teacher,
        teacher_checkpoint=checkpoint,
        min_map=teacher_sec.float("min_map", 0.0, low=0.0, high=1.0),
        student=student,
        resources=resources,
        output_dir=root.file_path("output_dir", base, default="runs", must_exist=False)
        if "output_dir" in root.data
        else Path.cwd() / "runs",
        seed=root.int("seed", 0, low=0),
        search=search,
        source=source,
    )


def load_spec(path: str | Path) -> RunSpec:
    """Read and validate a spec file; errors carry the file and the entry's line."""
    path = Path(path).resolve()
    data, source = load_yaml(path)
    try:
        return parse_spec(data, path, source)
    except SpecError as err:
        raise source.error(err) from None


def config_hash(*parts: Any) -> str:
    """A short content hash of JSON-able parts (stage caching, run identity)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
