"""The search's progress lines: an epoch that was not evaluated must not read as a score of 0."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rkd.search.progress import ProgressPrinter
from rkd.train.checkpoint import SCORE_METRIC, UNSCORED


def epoch_lines(results: list[dict]) -> list[str]:
    out = io.StringIO()
    printer = ProgressPrinter(total=2, stream=out, metric="top1")
    # What the callback reads of a Tune trial: its id and the tag that carries Tune's trial number.
    trial = SimpleNamespace(trial_id="a1", experiment_tag="2_lr=0.001", config={})
    for result in results:
        printer.on_trial_result(0, [trial], trial, result)
    return out.getvalue().splitlines()


def test_an_epoch_between_evaluations_says_not_evaluated_and_the_last_gives_its_score():
    common = {"epochs": 4, "images_per_s": 30.0}
    lines = epoch_lines(
        [
            {**common, "epoch": 1, "loss": 12.5, "top1": 0.0, SCORE_METRIC: UNSCORED},
            {**common, "epoch": 4, "loss": 0.25, "top1": 0.8967, SCORE_METRIC: 0.8967},
        ]
    )
    assert len(lines) == 2
    assert lines[0].endswith("trial 2/2 epoch 1/4 loss 12.5000 not evaluated (30.0 img/s)"), lines[0]
    assert "0.000" not in lines[0]
    assert lines[1].endswith("trial 2/2 epoch 4/4 loss 0.2500 val top-1 0.897 (30.0 img/s)"), lines[1]


def test_the_confirm_stage_names_itself_and_numbers_its_grid_from_one():
    # The confirm stage's trainings are a tune.grid_search: Tune tags its variants 0_..., 1_..., 2_...
    out = io.StringIO()
    printer = ProgressPrinter(total=3, stream=out, metric="top1", stage="confirm", first_tag=0)
    for i in range(3):
        trial = SimpleNamespace(trial_id=f"t{i}", experiment_tag=f"{i}_job=kd-s{i + 1}", config={})
        printer.on_trial_start(0, [trial], trial)
    starts = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1].split(" started")[0] for line in starts] == ["trial 1/3", "trial 2/3", "trial 3/3"]
    assert all(line.startswith("[confirm ") for line in starts), starts
