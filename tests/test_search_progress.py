"""The search's progress lines: an epoch that was not evaluated must not read as a score of 0."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rkd.search.progress import ProgressPrinter
from rkd.train.checkpoint import SCORE_METRIC, UNSCORED


def epoch_lines(results: list[dict], stage: str = "search") -> list[str]:
    out = io.StringIO()
    printer = ProgressPrinter(total=2, stream=out, metric="top1", stage=stage)
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


def test_the_confirm_stage_names_itself():
    (line,) = epoch_lines([{"epoch": 1, "epochs": 4, "loss": 1.0, "top1": 0.0, SCORE_METRIC: UNSCORED}], "confirm")
    assert line.startswith("[confirm 0m00s] trial 2/2 epoch 1/4"), line
