"""Bad input gets a clear message naming the entry and its file:line, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import yaml
from cli_helpers import REPO, base_spec, line_of, run_cli, write

from rkd.errors import SpecError
from rkd.train.spec import load_spec

UCAS = REPO.parent / "shared" / "data" / "ucas50"


def test_valid_spec_loads_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, base_spec(tmp_path)))
    assert spec.name == "t" and spec.teacher.epochs == 1 and spec.resources.workers == 1
    assert spec.student.model["backbone"]["width"] == 0.25
    assert spec.run_dir == tmp_path / "runs" / "t"


@pytest.mark.parametrize(
    "mutate, path, needle",
    [
        (lambda s: s.update(studnet={}), "studnet", "did you mean 'student'"),
        (lambda s: s["teacher"].update(epochs="ten"), "teacher.epochs", "expected an integer"),
        (lambda s: s["teacher"].update(epochs=0), "teacher.epochs", ">= 1"),
        (lambda s: s["student"]["model"]["backbone"].update(widht=1), "student.model.backbone.widht", "unknown"),
        (lambda s: s["teacher"].update(min_map=2), "teacher.min_map", "<= 1"),
        (lambda s: s["resources"] if False else s.update(resources={"workers": -1}), "resources.workers", ">= 1"),
        (lambda s: s["teacher"].update(checkpoint="missing.pt"), "teacher.checkpoint", "does not exist"),
        (lambda s: s["student"].update(methods={"fitnett": {}}), "student.methods.fitnett", "unknown"),
        (lambda s: s.pop("teacher"), "teacher", "required"),
    ],
)
def test_bad_entries_are_named_with_file_and_line(tmp_path, capsys, mutate, path, needle):
    spec = base_spec(tmp_path)
    mutate(spec)
    spec_path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(spec_path)
    assert err.value.path.startswith(path), err.value
    assert needle in str(err.value)
    assert err.value.file == str(spec_path) and err.value.line is not None
    code, stderr = run_cli(capsys, "search", str(spec_path))
    assert code == 2
    assert stderr.startswith(f"rkd: error: {spec_path}:{err.value.line}: ") and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_line_number_points_at_the_bad_entry(tmp_path):
    text = yaml.safe_dump(base_spec(tmp_path), sort_keys=False).replace("epochs: 1\n", "epochs: -3\n", 1)
    spec_path = write(tmp_path, {}, text)
    with pytest.raises(SpecError) as err:
        load_spec(spec_path)
    assert err.value.line == line_of(spec_path, "epochs: -3")


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    spec_path = write(tmp_path, {}, "name: t\ndata: [unclosed\n")
    code, stderr = run_cli(capsys, "search", str(spec_path))
    assert code == 2 and "invalid YAML" in stderr and str(spec_path) in stderr
    code, stderr = run_cli(capsys, "search", str(tmp_path / "nope.yaml"))
    assert code == 2 and "file not found" in stderr


def test_bad_search_space_entry_reports_the_space_file(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("methods:\n  hinton:\n    temprature: default\n")
    spec = base_spec(tmp_path)
    spec["search"]["space"] = str(space)
    code, stderr = run_cli(capsys, "search", str(write(tmp_path, spec)))
    assert code == 2 and f"{space}:3: methods.hinton.temprature" in stderr


def test_student_values_of_the_space_are_validated_before_training(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("student:\n  model.backbone.width: {choices: [0.5, -2]}\n")
    spec = base_spec(tmp_path)
    spec["search"]["space"] = str(space)
    code, stderr = run_cli(capsys, "search", str(write(tmp_path, spec)))
    assert code == 2 and f"{space}:2: student.model.backbone.width" in stderr and "-2" in stderr


@pytest.mark.skipif(not UCAS.is_dir(), reason="../shared/data/ucas50 not present")
def test_a_label_line_that_does_not_parse_names_file_and_line(tmp_path, capsys):
    root = tmp_path / "ucas"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        src = sorted((UCAS / "images" / split).iterdir())[0]
        (root / "images" / split / src.name).write_bytes(src.read_bytes())
        label = (UCAS / "labels" / split / (src.stem + ".txt")).read_text()
        (root / "labels" / split / (src.stem + ".txt")).write_text(label)
    bad = root / "labels" / "train" / (sorted((root / "labels" / "train").iterdir())[0].name)
    lines = bad.read_text().splitlines()
    lines.insert(1, "0 0.1 0.2 0.3")  # too few fields on line 2
    bad.write_text("\n".join(lines) + "\n")
    spec = base_spec(tmp_path)
    spec["data"] = {"format": "ucas", "root": str(root), "classes": ["plane", "car"], "input_size": 128}
    code, stderr = run_cli(capsys, "search", str(write(tmp_path, spec)))
    assert code == 2 and f"{bad}:2" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("objectives", [["map50", "latency"], ["gflops"], ["map50", "gflops", "gflops"], "map50"])
def test_bad_search_objectives_are_named_with_file_and_line(tmp_path, capsys, objectives):
    spec = base_spec(tmp_path)
    spec["search"]["objectives"] = objectives
    spec_path = write(tmp_path, spec)
    code, stderr = run_cli(capsys, "search", str(spec_path))
    assert code == 2
    assert stderr.startswith(f"rkd: error: {spec_path}:{line_of(spec_path, 'objectives')}: search.objectives: ")
    assert not (tmp_path / "runs").exists()
