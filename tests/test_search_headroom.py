"""The teacher's headroom over the best student trained without KD (``summary.json: teacher_headroom``)."""

from __future__ import annotations

import pytest

from rkd.search.headroom import headroom_line, teacher_headroom
from rkd.search.rows import mark_collapsed


def row(trial_id: str, top1: float | None, reference: str | None = "no KD", status: str = "complete") -> dict:
    return {"trial_id": trial_id, "top1": top1, "gflops": 0.2, "reference": reference, "status": status}


ROWS = [
    row("small", 0.70),
    row("wide", 0.80),
    row("lost", None, status="failed"),
    row("broke", 0.99, status="diverged"),  # not a finished student: never the reference
    row("kd", 0.95, reference=None),  # distilled: not a student alone
    row("hinton-defaults", 0.97, reference="hinton defaults"),
]


def test_headroom_is_the_teacher_minus_the_best_complete_student_alone():
    h = teacher_headroom({"top1": 0.85, "gflops": 1.0}, ROWS, "top1")
    assert h["trial_id"] == "wide" and h["student_alone"] == 0.80 and h["teacher"] == 0.85
    assert h["headroom"] == pytest.approx(0.85 - 0.80, abs=1e-15)
    line = headroom_line(h)
    assert line.startswith("teacher headroom +0.050 top-1: teacher 0.850, best student without KD 0.800 (trial wide)")
    assert "no higher" not in line


def test_a_teacher_no_better_than_the_student_alone_is_said_to_leave_kd_little():
    h = teacher_headroom({"top1": 0.80}, ROWS, "top1")
    assert h["headroom"] == 0.0
    assert "teacher scores no higher than the student alone" in headroom_line(h)
    assert "no higher" in headroom_line(teacher_headroom({"top1": 0.79}, ROWS, "top1"))


def test_no_headroom_without_a_finished_student_alone_or_a_teacher_score():
    assert teacher_headroom({"top1": 0.85}, [r for r in ROWS if r["trial_id"] not in ("small", "wide")], "top1") is None
    assert teacher_headroom({"map50": 0.5}, ROWS, "top1") is None
    assert headroom_line(None) == ""


def test_collapsed_trials_are_marked_against_the_first_scored_student_alone():
    # mark_collapsed and teacher_headroom read the no-KD reference through one filter (results.no_kd_rows):
    # the unscored and unfinished no-KD trials are skipped by both
    rows = [
        row("lost", None, status="failed"),
        row("first", 0.40),
        row("second", 0.60),
        row("zero", 0.0, reference=None),
        row("fine", 0.30, reference=None),
    ]
    mark_collapsed(rows, "top1")
    zero = rows[3]
    assert zero["status"] == "diverged" and zero["checkpoint"] is None
    assert zero["reason"] == "diverged: val top-1 0 after training, the no-KD reference first reaches 0.400"
    assert rows[4]["status"] == "complete" and rows[1]["status"] == "complete"
    assert teacher_headroom({"top1": 0.7}, rows, "top1")["trial_id"] == "second"


def test_a_sampled_trial_with_every_kd_method_off_is_a_student_alone_too():
    # the searcher may switch every method off (e.g. at a better lr than the reference's): the best
    # student without KD is then that trial, and the headroom is measured over it
    rows = [*ROWS, {**row("sampled-alone", 0.83, reference=None), "kd_methods": ""}]
    h = teacher_headroom({"top1": 0.85}, rows, "top1")
    assert h["trial_id"] == "sampled-alone" and h["headroom"] == pytest.approx(0.85 - 0.83, abs=1e-15)
    # a sampled trial that distils (kd_methods named) is not
    rows = [*ROWS, {**row("sampled-kd", 0.83, reference=None), "kd_methods": "hinton"}]
    assert teacher_headroom({"top1": 0.85}, rows, "top1")["trial_id"] == "wide"


def test_nothing_is_marked_collapsed_when_the_student_alone_scores_0_too():
    rows = [row("alone", 0.0), row("kd", 0.0, reference=None)]
    mark_collapsed(rows, "top1")
    assert [r["status"] for r in rows] == ["complete", "complete"]
