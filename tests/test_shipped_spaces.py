"""Every shipped search space compiles against the quickstart student, and every
configuration it can produce is a valid student with KD methods its teacher supports."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import rkd.distill  # noqa: F401  (registers the methods)
from rkd.distill.base import KD_METHODS
from rkd.distill.distiller import build_distiller
from rkd.models import build_detector
from rkd.search.space import load_space, split_params
from rkd.train.spec import load_spec, with_overrides

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"
SHIPPED = ["nsd", "ds2d2", "ifkd", "cid", "baselines", "combined"]
# The scene-classification spaces and the student each is written for (a convnet trained from scratch;
# an EfficientNet-Lite whose pretrained weights the test leaves unloaded).
CLASSIFICATION = {
    "sskd": {"name": "convnet", "width": 0.5},
    "scenes_pretrained": {"name": "efficientnet_lite0", "pretrained": False},
    "scenes_resolution": {"name": "efficientnet_lite0", "pretrained": False},
    "scenes_kd": {"name": "efficientnet_lite0", "pretrained": False},
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def quickstart():
    spec = load_spec(REPO / "examples" / "quickstart.yaml")
    num_classes = int(spec.data["num_classes"])
    teacher_info = build_detector(spec.teacher.model, num_classes).info
    return spec.student, teacher_info, num_classes


def compile_shipped(name: str, student):
    return load_space(SPACES / f"{name}.yaml", student_check=lambda overrides: with_overrides(student, overrides))


def test_every_shipped_space_is_listed_here():
    # A new space file must be added to SHIPPED, so it is compiled and sampled below.
    assert sorted(p.stem for p in SPACES.glob("*.yaml")) == sorted(SHIPPED + ["skeleton"] + list(CLASSIFICATION))


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_the_classification_spaces_produce_valid_classifier_students(name):
    from rkd.distill import CLASSIFIER_KD_METHODS, build_distiller
    from rkd.models import build_classifier
    from rkd.models.flops import count_flops
    from rkd.train.config import TrainConfig

    student = TrainConfig(
        model={"kind": "classifier", "backbone": dict(CLASSIFICATION[name])}, epochs=1, batch_size=4, lr=1e-3
    )
    space = load_space(
        SPACES / f"{name}.yaml",
        student_check=lambda o: with_overrides(student, o, task="classification"),
        registry=CLASSIFIER_KD_METHODS,
    )
    assert set(space.methods()) == {"sskd", "dkd", "hinton"}
    teacher_info = build_classifier({"backbone": {"width": 1.0}}, 5).info
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    gflops = set()
    for _ in range(12):
        trial = study.ask()
        params = {**space.define_by_run(trial), **trial.params}
        overrides, methods = split_params(params)
        cfg = with_overrides(student, overrides, methods, task="classification")
        model = build_classifier(cfg.model, 5)
        build_distiller(cfg.methods, model.info, teacher_info)
        gflops.add(round(count_flops(model, 128).gflops, 6))  # the size of the data's chips; resize_to may differ
        study.tell(trial, [0.0, 0.0])
    if space.size_dims():
        assert len(gflops) > 1, "the student's size is searched, so the front spans several GFLOPs"
    else:  # scenes_kd: the spec's budget has chosen the student; only how it is distilled is searched
        assert len(gflops) == 1


def test_the_spaces_cover_every_registered_method(quickstart):
    student, _, _ = quickstart
    combined = compile_shipped("combined", student)
    assert sorted(combined.methods()) == sorted(KD_METHODS)
    per_method = set()
    for name in SHIPPED[:-1]:
        per_method |= set(compile_shipped(name, student).methods())
    assert per_method == set(KD_METHODS)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_samples_valid_conditional_students(name, quickstart):
    student, teacher_info, num_classes = quickstart
    space = compile_shipped(name, student)
    dims = {d.name: d for d in space.dims}
    # The student architecture is searched so FLOPs vary along the front.
    for path in ("student.model.backbone.width", "student.model.neck.channels"):
        assert path in dims and dims[path].size() > 1, path
    switchable = [m for m in space.methods() if dims[f"methods.{m}"].kind == "choice"]
    assert switchable == space.methods(), "shipped spaces let the search switch every method off (no-KD baseline)"

    # The sampler the runner uses: joint TPE over the conditional groups, after 10 random trials.
    sampler = optuna.samplers.TPESampler(seed=1, multivariate=True, group=True, n_startup_trials=10)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen = {m: set() for m in space.methods()}
    for _ in range(30):
        trial = study.ask()
        constants = space.define_by_run(trial)
        params = {**trial.params, **constants}
        for method in space.methods():
            on = params[f"methods.{method}"]
            seen[method].add(on)
            method_params = [k for k in params if k.startswith(f"methods.{method}.")]
            # A method's parameters are present only when it is on (a method may have none searched:
            # under the loss balance a single-weight method contributes its switch alone).
            assert on or not method_params, (method, params)
            if on:
                declared = {d.name for d in space.dims if d.condition == f"methods.{method}"}
                assert set(method_params) == declared
        # The configuration builds: a valid student spec, a detector, and KD methods that
        # accept this student and the quickstart teacher.
        overrides, methods = split_params(params)
        config = with_overrides(student, overrides, methods)
        info = build_detector(config.model, num_classes).info
        build_distiller(config.methods, info, teacher_info)
        # Varied objectives so TPE splits good from bad trials as in a real search.
        study.tell(trial, [len(methods) + trial.number % 7 / 7, float(overrides["model.backbone.width"])])
    assert all(s == {True, False} for s in seen.values()), seen
