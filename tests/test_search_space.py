"""The search-space compiler: conditionality, ranges, fixed values and errors with file:line."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from rkd.errors import SpecError
from rkd.search.space import compile_space, load_space, split_params

REPO = Path(__file__).resolve().parents[1]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, n: int, seed: int = 0) -> list[dict]:
    """Real Optuna trials drawn through the define-by-run function (params + constants)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, [0.0, 0.0])
    return out


def test_method_parameters_exist_only_when_the_method_is_on():
    space = compile_space(
        {
            "student": {"model.backbone.width": {"choices": [0.25, 0.5]}},
            "methods": {"fitnet": {"weight": "default"}, "hinton": {"weight": {"low": 0.1, "high": 10, "log": True}}},
        },
        "s.yaml",
    )
    trials = sample(space, 40)
    seen_on = seen_off = False
    for params in trials:
        for method in ("fitnet", "hinton"):
            on = params[f"methods.{method}"]
            has_params = any(k.startswith(f"methods.{method}.") for k in params)
            assert has_params == on, params
            seen_on |= on
            seen_off |= not on
        assert params["student.model.backbone.width"] in (0.25, 0.5)
        if params["methods.hinton"]:
            assert 0.1 <= params["methods.hinton.weight"] <= 10
    assert seen_on and seen_off


def test_default_uses_the_declared_range_and_fixed_values_are_constants():
    from rkd.distill.base import KD_METHODS

    declared = KD_METHODS["hinton"].params["temperature"]
    space = compile_space({"methods": {"hinton": {"enabled": True, "temperature": "default", "weight": 2.5}}}, "s.yaml")
    dims = {d.name: d for d in space.dims}
    assert dims["methods.hinton"].kind == "fixed" and dims["methods.hinton"].value is True
    temp = dims["methods.hinton.temperature"]
    assert (temp.low, temp.high, temp.log) == (declared.low, declared.high, declared.log)
    for params in sample(space, 10):
        assert params["methods.hinton"] is True and params["methods.hinton.weight"] == 2.5
        assert declared.low <= params["methods.hinton.temperature"] <= declared.high
    assert dims["methods.hinton.weight"].size() == 1 and math.isinf(temp.size()) == (temp.kind == "float")


def test_a_method_with_no_parameters_listed_searches_all_declared_ones():
    from rkd.distill.base import KD_METHODS

    space = compile_space({"methods": {"hinton": "default"}}, "s.yaml")
    names = {d.name for d in space.dims}
    assert names == {"methods.hinton"} | {f"methods.hinton.{p}" for p in KD_METHODS["hinton"].params}


def test_baseline_point_switches_every_method_off():
    space = compile_space({"methods": {"fitnet": {}, "hinton": {"enabled": True}}}, "s.yaml")
    # hinton is always on, so only fitnet can be switched off
    assert space.baseline_point() == {"methods.fitnet": False}


def test_split_params_builds_student_overrides_and_methods():
    params = {
        "student.model.backbone.width": 0.5,
        "student.lr": 0.002,
        "methods.fitnet": True,
        "methods.fitnet.weight": 0.3,
        "methods.hinton": False,
    }
    student, methods = split_params(params, base_methods={"hinton": {"weight": 1.0}})
    assert student == {"model.backbone.width": 0.5, "lr": 0.002}
    assert methods == {"fitnet": {"weight": 0.3}}  # the search switched the base hinton off


@pytest.mark.parametrize(
    "doc, path, needle",
    [
        ({"methods": {"fitnett": {}}}, "methods.fitnett", "unknown KD method"),
        ({"methods": {"hinton": {"temprature": "default"}}}, "methods.hinton.temprature", "unknown parameter"),
        ({"methods": {"hinton": {"weight": {"low": 5, "high": 1}}}}, "methods.hinton.weight", "low < high"),
        (
            {"methods": {"hinton": {"weight": {"low": 0, "high": 1, "log": True}}}},
            "methods.hinton.weight.log",
            "low > 0",
        ),
        ({"methods": {"hinton": {"enabled": "yes"}}}, "methods.hinton.enabled", "expected true"),
        ({"student": {"lr": [1, 2]}}, "student.lr", "choices"),
        ({"students": {}}, "students", "unknown section"),
        ({}, "", "empty"),
    ],
)
def test_invalid_spaces_name_the_entry(doc, path, needle):
    with pytest.raises(SpecError) as err:
        compile_space(doc, "s.yaml")
    assert err.value.path == path
    assert needle in err.value.message


def test_errors_from_files_carry_the_line(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("student:\n  lr: {low: 1.0e-3, high: 1.0e-2}\nmethods:\n  hinton:\n    weight: {low: 2, high: 1}\n")
    with pytest.raises(SpecError) as err:
        load_space(bad)
    assert str(err.value).startswith(f"{bad}:5: methods.hinton.weight:")


def test_student_paths_are_checked_with_every_choice():
    def check(overrides):
        if overrides.get("model.backbone.width", 1) <= 0:
            raise SpecError("model.backbone.width", "must be > 0")

    with pytest.raises(SpecError) as err:
        compile_space({"student": {"model.backbone.width": {"choices": [0.5, -1]}}}, "s.yaml", student_check=check)
    assert err.value.path == "student.model.backbone.width" and "-1" in err.value.message


def test_shipped_skeleton_space_compiles():
    space = load_space(REPO / "search_spaces" / "skeleton.yaml")
    assert set(space.methods()) == {"fitnet", "hinton"}
    assert any(d.name == "student.model.backbone.width" and len(d.choices) >= 2 for d in space.dims)


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_drives_a_conditional_space_and_is_seeded(name):
    from rkd.search.runner import make_sampler

    space = load_space(REPO / "search_spaces" / "combined.yaml")

    def run(seed: int) -> list[dict]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(name, seed, trials=9))
        for _ in range(9):
            trial = study.ask()
            space.define_by_run(trial)
            # A made-up trade-off so the model-based samplers have something to fit.
            width = float(trial.params.get("student.model.backbone.width", 0.5))
            study.tell(trial, [width - 0.1 * len(trial.params), width**2])
        return [t.params for t in study.trials]

    first = run(seed=3)
    assert first == run(seed=3)  # seeded: the same search twice
    assert first != run(seed=4)
    assert all(isinstance(p, dict) and p for p in first)


def test_published_default_points_switch_one_method_on_at_its_declared_defaults():
    from rkd.distill.base import KD_METHODS

    space = load_space(REPO / "search_spaces" / "combined.yaml")
    points = space.published_default_points()
    assert set(points) == set(space.methods())
    for method, point in points.items():
        on = [k for k, v in point.items() if k.count(".") == 1 and v is True]
        assert on == [f"methods.{method}"]
        for name, value in point.items():
            if name.startswith(f"methods.{method}."):
                assert value == KD_METHODS[method].params[name.rsplit(".", 1)[1]].published_value
        # Optuna really produces the point: enqueued, the define-by-run trial takes every given value
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
        study.enqueue_trial(point)
        trial = study.ask()
        space.define_by_run(trial)
        assert {k: trial.params[k] for k in point} == point


def test_reference_rows_are_labelled_by_their_configuration():
    from rkd.search.rows import label_references

    refs = {
        "no KD": {"methods.hinton": False},
        "hinton defaults": {"methods.hinton": True, "methods.hinton.temperature": 4.0},
    }
    rows = [
        {"params": {"methods.hinton": False, "student.lr": 0.01}},
        {"params": {"methods.hinton": True, "methods.hinton.temperature": 4.0}},
        {"params": {"methods.hinton": True, "methods.hinton.temperature": 2.0}},
    ]
    label_references(rows, refs)
    assert [r["reference"] for r in rows] == ["no KD", "hinton defaults", None]


def test_a_method_option_is_a_fixed_validated_value_of_the_space(tmp_path):
    space = compile_space(
        {"methods": {"ifkd": {"prior": {"kind": "builtin"}, "alpha": "default"}}}, str(tmp_path / "s.yaml")
    )
    prior = next(d for d in space.dims if d.name == "methods.ifkd.prior")
    assert prior.kind == "fixed" and prior.condition == "methods.ifkd" and prior.value["kind"] == "builtin"
    with pytest.raises(SpecError) as err:
        compile_space(
            {"methods": {"ifkd": {"prior": {"kind": "sam", "checkpoint": "nope.pth"}}}}, str(tmp_path / "s.yaml")
        )
    assert err.value.path.startswith("methods.ifkd.prior") and "nope.pth" in str(err.value)


def test_the_backbone_family_is_searchable_and_changes_flops():
    from rkd.models import build_detector
    from rkd.models.flops import count_flops
    from rkd.train.spec import load_spec, with_overrides

    student = load_spec(REPO / "examples" / "quickstart.yaml").student  # convnet with depth 1
    space = compile_space(
        {"student": {"model.backbone.name": {"choices": ["convnet", "mobilenet_v2", "resnet18"]}}},
        "s.yaml",
        student_check=lambda overrides: with_overrides(student, overrides),
    )
    flops = {}
    for params in sample(space, 12):
        overrides, _ = split_params(params)
        cfg = with_overrides(student, overrides)
        name = cfg.model["backbone"]["name"]
        assert ("depth" in cfg.model["backbone"]) == (name == "convnet")  # convnet's own key does not carry over
        assert cfg.model["backbone"]["width"] == student.model["backbone"]["width"]  # a shared key does
        flops[name] = count_flops(build_detector(cfg.model, 3), 128).gflops
    assert len(flops) == 3 and len(set(flops.values())) == 3


def test_published_default_points_run_the_published_weights_without_the_loss_balance():
    from rkd.search.space import BALANCE_MODE
    from rkd.train.spec import load_spec, with_overrides

    space = load_space(REPO / "search_spaces" / "skeleton.yaml").with_published_choices()
    assert space.with_published_choices() is space  # added once
    points = space.published_default_points()
    assert {p[BALANCE_MODE] for p in points.values()} == {"off"}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(points["hinton"])
    trial = study.ask()
    space.define_by_run(trial)
    student_overrides, methods = split_params(trial.params)
    student = with_overrides(load_spec(REPO / "examples" / "quickstart.yaml").student, student_overrides, methods)
    assert student.kd_balance["mode"] == "off" and set(student.methods) == {"hinton"}


def test_published_points_carry_published_values_the_space_does_not_search(tmp_path):
    """A parameter whose rkd default differs from its published value (``Param.published``) and that
    the space leaves to its default becomes a (default, published) choice, so the method's published
    point runs the published configuration, not rkd's defaults."""
    from rkd.distill.base import KD_METHODS, Param

    declared = KD_METHODS["nsd"].params
    assert declared["logit_form"].default == "binary" and declared["logit_form"].published_value == "softmax"
    space = compile_space({"methods": {"nsd": {"bg_weight": "default"}}}, str(tmp_path / "s.yaml"))
    assert {d.name for d in space.dims} == {"methods.nsd", "methods.nsd.bg_weight"}
    space = space.with_published_choices()
    added = {d.name: d for d in space.dims}
    assert added["methods.nsd.logit_form"].choices == ("binary", "softmax")
    assert added["methods.nsd.adapter_init"].choices == ("teacher_scale", "plain")
    assert added["methods.nsd.logit_form"].condition == "methods.nsd"
    point = space.published_default_points()["nsd"]
    assert point["methods.nsd.logit_form"] == "softmax" and point["methods.nsd.adapter_init"] == "plain"
    assert point["methods.nsd.bg_weight"] == declared["bg_weight"].default  # published = default there
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(point)
    trial = study.ask()
    space.define_by_run(trial)
    _, methods = split_params(trial.params)
    assert methods["nsd"]["logit_form"] == "softmax" and methods["nsd"]["adapter_init"] == "plain"
    with pytest.raises(ValueError, match="published: expected one of"):
        Param("choice", "a", choices=("a", "b"), published="c")


# Names pydantic gives the members of a union (and rkd gives an entry's shapes): never part of a path.
MEMBER_NAMES = ("SpaceRange", "SpaceChoices", "SpaceMethod", "SpaceEntry", "function-", "literal[", "{low, high}")


@pytest.mark.parametrize(
    "doc, path, needle",
    [
        ({"methods": {"fitnett": {}}}, "methods.fitnett", "unknown KD method (did you mean 'fitnet'?); known: "),
        (
            {"methods": {"hinton": {"temprature": 4}}},
            "methods.hinton.temprature",
            "unknown parameter of hinton (did you mean 'temperature'?); it has ",
        ),
        ({"studnet": {}}, "studnet", "unknown section (did you mean 'student'?)"),
        (
            {"student": {"modle.backbone.width": {"choices": [0.5, 1.0]}}},
            "student.modle.backbone.width",
            "unknown student setting (did you mean 'model'?)",
        ),
        ({"student": {"lr": {"low": 1e-3, "hihg": 1e-2}}}, "student.lr.hihg", "did you mean 'high'?"),
        ({"methods": {"hinton": {"weight": {"low": 1, "high": 2, "setp": 1}}}}, "methods.hinton.weight.setp", "'step'"),
        ({"methods": {"hinton": {"weight": {"choices": []}}}}, "methods.hinton.weight.choices", "non-empty list"),
        ({"methods": {"hinton": {"weight": {"choices": [1.0, -1.0]}}}}, "methods.hinton.weight", "must be > 0"),
        ({"methods": {"hinton": {"weight": [1, 2]}}}, "methods.hinton.weight", "a list is ambiguous"),
        ({"methods": {"hinton": {"weight": None}}}, "methods.hinton.weight", "expected a number, got None"),
        ({"methods": {"hinton": {"weight": {"low": True, "high": 2}}}}, "methods.hinton.weight.low", "got True"),
        (  # an int parameter's range is an int range
            {"methods": {"ds2d2": {"hf_channels": {"low": 8, "high": 64, "step": 0.5}}}},
            "methods.ds2d2.hf_channels.step",
            "whole step",
        ),
        ({"student": {"lr": {"low": 1, "high": 9, "type": "int", "step": 0.5}}}, "student.lr.step", "whole step"),
        ({"student": {"lr": "default"}}, "student.lr", "only meaningful for a KD method"),
        ({"methods": {"hinton": {"enabled": [True, "no"]}}}, "methods.hinton.enabled", "[true, false]"),
        ({"methods": {"hinton": 3}}, "methods.hinton", "expected a mapping"),
        (
            {"methods": {"ifkd": {"prior": {"kind": "module", "target": "os:system"}}}},
            "methods.ifkd.prior.target",
            "--allow-code",
        ),
    ],
)
def test_the_space_model_names_the_entry_as_written_in_the_file(doc, path, needle, monkeypatch):
    """Every error comes from the space's pydantic model: the path is the entry's in the file (no
    union-member name in it or in the message), an unknown key says what it should be and suggests one."""
    monkeypatch.delenv("RKD_ALLOW_CODE", raising=False)
    with pytest.raises(SpecError) as err:
        compile_space(doc, "s.yaml")
    assert err.value.path == path and needle in err.value.message, err.value
    assert not any(name in str(err.value) for name in MEMBER_NAMES), err.value


def test_a_space_of_classification_names_its_methods_so():
    from rkd.distill.base import CLASSIFIER_KD_METHODS

    with pytest.raises(SpecError, match=r"methods.nsd: unknown classification KD method; known: .*sskd"):
        compile_space({"methods": {"nsd": {}}}, "s.yaml", registry=CLASSIFIER_KD_METHODS)


def test_a_misspelt_parameter_in_a_space_file_stops_the_cli_with_file_line_and_a_suggestion(tmp_path, capsys):
    from rkd.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("student:\n  lr: {low: 1.0e-3, high: 1.0e-2}\nmethods:\n  hinton:\n    temprature: default\n")
    assert main(["space", "show", str(space)]) == 2
    err = capsys.readouterr().err
    assert f"{space}:5: methods.hinton.temprature: unknown parameter of hinton (did you mean 'temperature'?)" in err
    assert "Traceback" not in err
