"""The first trials of a search span the student's sizes (SearchSpace.span_sizes, config.first_points)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from rkd.distill.base import CLASSIFIER_KD_METHODS
from rkd.search.config import SearchConfig, first_points
from rkd.search.space import compile_space, load_space

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = REPO / "search_spaces" / "scenes_resolution.yaml"
RESIZE = "student.model.resize_to"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def config(trials: int, initial_points=(), published_defaults: bool = False) -> SearchConfig:
    return SearchConfig(
        space_path=RESOLUTION,
        trials=trials,
        seed=0,
        sampler="tpe",
        objectives=("top1", "gflops"),
        max_gflops=None,
        initial_points=list(initial_points),
        published_defaults=published_defaults,
        scheduler=None,
        stop=None,
    )


def resolution_space():
    return load_space(RESOLUTION, registry=CLASSIFIER_KD_METHODS)


def test_the_first_points_try_every_input_resolution_smallest_first():
    points = first_points(resolution_space(), config(trials=6))
    no_kd = {"methods.hinton": False, "methods.sskd": False, "methods.dkd": False}
    # The no-KD reference stays first; the sizes go smallest, largest, then between.
    assert points == [{**no_kd, RESIZE: 64}, {RESIZE: 128}, {RESIZE: 96}]


def test_a_size_the_user_fixes_counts_as_tried_and_other_parameters_stay_theirs():
    points = first_points(resolution_space(), config(trials=8, initial_points=[{RESIZE: 128, "student.lr": 2e-3}]))
    assert points[0] == {RESIZE: 128, "student.lr": 2e-3}
    assert [p[RESIZE] for p in points] == [128, 64, 96]
    assert "student.lr" not in points[1] and "student.lr" not in points[2]


def test_points_are_added_for_at_most_half_the_trials_and_only_points_that_run_count():
    assert [p[RESIZE] for p in first_points(resolution_space(), config(trials=2))] == [64]
    assert len(first_points(resolution_space(), config(trials=4))) == 2
    # The published-defaults points (no KD + one per method) run anyway: the first three take sizes.
    points = first_points(resolution_space(), config(trials=3, published_defaults=True))
    assert [p[RESIZE] for p in points] == [64, 128, 96]
    # A size fixed only by a point the trial budget cuts off is not tried: it is given again.
    user = [{"student.lr": 2e-3}, {"student.lr": 3e-3}, {RESIZE: 64}]
    assert [p[RESIZE] for p in first_points(resolution_space(), config(trials=2, initial_points=user))] == [64, 128]


def test_a_value_listed_twice_is_tried_once():
    space = compile_space({"student": {"model.resize_to": {"choices": [64, 96, 64]}}}, "s.yaml")
    assert [p["student.model.resize_to"] for p in space.span_sizes([], limit=3)] == [64, 96]


def test_every_size_dim_is_spanned_side_by_side_and_only_the_students_architecture():
    space = load_space(REPO / "search_spaces" / "combined.yaml")
    dims = {d.name: d.choices for d in space.size_dims()}
    assert set(dims) == {
        "student.model.backbone.width",
        "student.model.backbone.depth",
        "student.model.neck.channels",
        "student.model.head.convs",
    }
    points = space.span_sizes([space.baseline_point()], limit=6)
    assert len(points) == 4  # the longest choice list, width and channels: 4 values
    for name, choices in dims.items():
        tried = [p[name] for p in points if name in p]
        assert sorted(tried) == sorted(choices)  # each value once (2-value dims: in the first two points)
    assert {k: v for k, v in points[0].items() if k in dims} == {n: c[0] for n, c in dims.items()}  # smallest
    assert {k: v for k, v in points[1].items() if k in dims} == {n: c[-1] for n, c in dims.items()}  # largest
    assert not any(k.startswith(("student.lr", "methods.")) for p in points[1:] for k in p)


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_a_six_trial_search_through_ray_tries_every_resolution(sampler):
    """The measured failure: 6 TPE trials on AID's resolution space tried 96 and 128 px, never 64.
    Through Ray Tune's Optuna searcher (real, as rkd search builds it), the first three trials now
    take 64, 128 and 96 px and every other parameter from the sampler."""
    from rkd.search.runner import ParetoOptunaSearch, make_sampler

    space = resolution_space()
    searcher = ParetoOptunaSearch(
        space=space.define_by_run,
        metric=["top1", "gflops"],
        mode=["max", "min"],
        sampler=make_sampler(sampler, seed=0, trials=6),
        points_to_evaluate=first_points(space, config(trials=6)),
    )
    tried = []
    for i in range(6):
        params = searcher.suggest(f"t{i}")
        side = params[RESIZE]
        tried.append(side)
        assert 1e-3 <= params["student.lr"] <= 4e-3
        # A made-up front where 96 px looks best, as on AID.
        top1 = 0.88 - abs(side - 96) / 400
        searcher.on_trial_complete(f"t{i}", {"top1": top1, "gflops": side**2 / 7e4, "epoch": 4, "epochs": 4})
    assert tried[:3] == [64, 128, 96]
    assert set(tried) == {64, 96, 128}


def test_the_no_kd_reference_keeps_the_students_size_the_spec_gives():
    from rkd.train.spec import load_spec

    spec = load_spec(REPO / "examples" / "quickstart.yaml")  # student width 0.5; skeleton space 0.25 / 0.5 / 0.75
    space = load_space(REPO / "search_spaces" / "skeleton.yaml")
    cfg = SearchConfig(**{**config(6, published_defaults=True).__dict__, "space_path": space.file})
    points = first_points(space, cfg, spec.student)
    width = "student.model.backbone.width"
    assert points[0] == {"methods.fitnet": False, "methods.hinton": False, width: 0.5}
    assert [p[width] for p in points] == [0.5, 0.25, 0.75]  # the published points take the other two
    # A student size the space does not list (aid_resolution's student has no resize_to): spanning as before.
    aid = load_spec(REPO / "examples" / "aid_resolution.yaml")
    assert first_points(resolution_space(), config(trials=6), aid.student)[0][RESIZE] == 64
