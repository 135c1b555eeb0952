"""The JSON Schemas of spec and search-space files: they accept every shipped file, refuse a misspelt
key (as load_spec does, with file:line and a suggestion), are up to date in schemas/, and
`rkd schema` writes them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from rkd.errors import SpecError
from rkd.train.spec import load_spec
from rkd.train.spec_schema import SCHEMA_FILES, space_json_schema, spec_json_schema

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))


class Yaml12Loader(yaml.SafeLoader):
    """Reads 1e-3 as a number, as YAML 1.2 (and so yaml-language-server) does; PyYAML's 1.1 reads a string."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"),
    list("-+0123456789."),
)


def errors(schema: dict, doc: object) -> list[str]:
    """``path: message`` of every error, with those inside an ``anyOf`` (an optional section) too."""
    found, todo = [], list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    while todo:
        e = todo.pop()
        found.append(f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
        todo += e.context or []
    return found


def read(path: Path) -> object:
    return yaml.load(path.read_text(), Loader=Yaml12Loader)


def minimal_spec() -> dict:
    model = {"kind": "retinanet", "backbone": {"name": "convnet", "width": 0.5}}
    return {
        "name": "t",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 4, "num_val": 2, "input_size": 128},
        "teacher": {"model": model, "epochs": 1},
        "student": {"model": model, "epochs": 1, "methods": {"hinton": {"weight": 2.0}}},
    }


def test_the_schemas_are_draft_2020_12_and_valid():
    for schema in (spec_json_schema(), space_json_schema()):
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_fits_the_spec_schema_and_names_it(path):
    assert errors(spec_json_schema(), read(path)) == []
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=../schemas/rkd-spec.schema.json"


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_fits_the_space_schema_and_names_it(path):
    assert errors(space_json_schema(), read(path)) == []
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=../schemas/rkd-space.schema.json"


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda s: s.update(studnet=s.pop("student")), ""),
        (lambda s: s["teacher"].update(epohcs=3), "teacher"),
        (lambda s: s["student"]["methods"].update(hintn={}), "student.methods"),
        (lambda s: s["student"]["methods"]["hinton"].update(temprature=4), "student.methods.hinton"),
    ],
)
def test_a_misspelt_key_is_refused_by_the_schema(mutate, where):
    spec = minimal_spec()
    assert errors(spec_json_schema(), spec) == []
    mutate(spec)
    found = errors(spec_json_schema(), spec)
    assert any(e.startswith(f"{where}:") and "not allowed" in e for e in found), found


@pytest.mark.parametrize(
    "task, method, allowed",
    [(None, "nsd", True), (None, "sskd", False), ("classification", "sskd", True), ("classification", "nsd", False)],
)
def test_the_student_methods_are_those_of_the_spec_task(task, method, allowed):
    spec = minimal_spec()
    if task is not None:
        spec["task"] = task
    spec["student"]["methods"] = {method: {}, "hinton": {}}  # hinton: a method of both tasks
    found = errors(spec_json_schema(), spec)
    refused = any(e.startswith("student.methods:") and repr(method) in e and "not allowed" in e for e in found)
    assert refused != allowed and (found == []) == allowed, found


def test_a_misspelt_space_entry_is_refused_by_the_schema():
    good = {
        "methods": {"hinton": {"weight": "default", "enabled": True}},
        "student": {"lr": {"low": 1e-3, "high": 1e-2}},
    }
    assert errors(space_json_schema(), good) == []
    assert errors(space_json_schema(), {"methods": {"hinton": {"temprature": "default"}}})
    assert errors(space_json_schema(), {"student": {"lr": {"low": 1e-3, "hihg": 1e-2}}})


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "mutate, path, key, hint",
    [
        (lambda s: s.update(studnet=s.pop("student")), "studnet", "studnet:", "student"),
        (lambda s: s["student"].update(epohcs=3), "student.epohcs", "epohcs:", "epochs"),
        (
            lambda s: s["student"]["methods"]["hinton"].update(temprature=4),
            "student.methods.hinton.temprature",
            "temprature:",
            "temperature",
        ),
        (
            lambda s: s["teacher"].update(logging={"tensorbord": True}),
            "teacher.logging.tensorbord",
            "tensorbord:",
            "tensorboard",
        ),
    ],
)
def test_load_spec_names_a_misspelt_key_with_file_line_and_a_suggestion(tmp_path, mutate, path, key, hint):
    spec = minimal_spec()
    mutate(spec)
    spec_path = write_spec(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(spec_path)
    assert err.value.path == path
    assert err.value.file == str(spec_path) and err.value.line == line_of(spec_path, key)
    assert f"did you mean {hint!r}" in str(err.value)


@pytest.mark.parametrize(
    "mutate, path, needle",
    [
        (lambda s: s["student"].update(batch_size="eight"), "student.batch_size", "expected an integer, got 'eight'"),
        (
            lambda s: s["teacher"].update(logging={"mlflow": "maybe"}),
            "teacher.logging.mlflow",
            "expected true or false",
        ),
        (
            lambda s: s["student"]["methods"]["hinton"].update(weight="heavy"),
            "student.methods.hinton.weight",
            "expected a number",
        ),
        (lambda s: s.update(resources=[1, 2]), "resources", "expected a mapping"),
    ],
)
def test_a_wrong_type_is_named_by_its_path(tmp_path, mutate, path, needle):
    spec = minimal_spec()
    mutate(spec)
    assert errors(spec_json_schema(), spec)
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path, spec))
    assert err.value.path == path and needle in str(err.value), err.value


def test_the_shipped_schemas_are_up_to_date():
    for name, make in SCHEMA_FILES.items():
        shipped = json.loads((REPO / "schemas" / name).read_text())
        assert shipped == json.loads(json.dumps(make())), f"schemas/{name} is stale: run `rkd schema`"


def test_rkd_schema_writes_both_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's rkd, whatever is installed
    done = subprocess.run(
        [sys.executable, "-m", "rkd.cli", "schema", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / name) for name in SCHEMA_FILES]
    assert json.loads((out / "rkd-spec.schema.json").read_text()) == json.loads(json.dumps(spec_json_schema()))
    assert json.loads((out / "rkd-space.schema.json").read_text()) == json.loads(json.dumps(space_json_schema()))
