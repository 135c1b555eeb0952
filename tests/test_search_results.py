"""Pareto front, hypervolume and the results files, against brute-force references."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from rkd.search.plot import plot_front
from rkd.search.results import front_rows, hypervolume, knee, pareto_mask, trials_table, write_parquet


def brute_force_front(map50, gflops):
    """Point i is on the front unless some j is at least as good on both and better on one."""
    n = len(map50)
    keep = []
    for i in range(n):
        dominated = any(
            map50[j] >= map50[i] and gflops[j] <= gflops[i] and (map50[j] > map50[i] or gflops[j] < gflops[i])
            for j in range(n)
        )
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    map50 = rng.integers(0, 20, 60) / 20.0  # ties on purpose
    gflops = rng.integers(1, 15, 60) / 4.0
    np.testing.assert_array_equal(pareto_mask(map50, gflops), brute_force_front(map50, gflops))


def test_hypervolume_of_a_staircase():
    # points (mAP, GFLOPs): (0.5, 1), (0.8, 3); reference (0, 4):
    # area = 0.5*(4-1) + (0.8-0.5)*(4-3) = 1.5 + 0.3
    assert hypervolume(np.array([0.5, 0.8]), np.array([1.0, 3.0]), 4.0) == pytest.approx(1.8)
    assert hypervolume(np.array([0.5]), np.array([5.0]), 4.0) == 0.0


def rows_with_statuses():
    return [
        {"trial_id": "a", "status": "complete", "map50": 0.5, "gflops": 1.0, "kd_methods": ""},
        {"trial_id": "b", "status": "complete", "map50": 0.7, "gflops": 2.0, "kd_methods": "fitnet"},
        # stopped early with a truncated but "better" metric: must never be on the front
        {"trial_id": "c", "status": "stopped", "map50": 0.9, "gflops": 0.5, "kd_methods": "hinton"},
        {"trial_id": "d", "status": "failed", "map50": None, "gflops": 0.4, "kd_methods": "hinton"},
        {"trial_id": "e", "status": "complete", "map50": 0.6, "gflops": 3.0, "kd_methods": "hinton"},
        {"trial_id": "f", "status": "complete", "map50": 0.72, "gflops": 4.0, "kd_methods": "fitnet,hinton"},
    ]


def test_front_holds_only_complete_trials_sorted_by_gflops():
    front = front_rows(rows_with_statuses())
    assert [r["trial_id"] for r in front] == ["a", "b", "f"]


def test_knee_is_the_point_farthest_from_the_chord():
    front = [
        {"trial_id": "lo", "map50": 0.1, "gflops": 1.0},
        {"trial_id": "mid", "map50": 0.8, "gflops": 2.0},
        {"trial_id": "hi", "map50": 0.85, "gflops": 10.0},
    ]
    assert knee(front)["trial_id"] == "mid"


def test_trials_table_round_trips_through_parquet(tmp_path):
    rows = rows_with_statuses()
    for r in rows:
        r["params"] = {"student.lr": 0.001, "methods.fitnet": "fitnet" in r["kd_methods"]}
    path = tmp_path / "trials.parquet"
    write_parquet(trials_table(rows), path)
    back = pq.read_table(path).to_pylist()
    assert [r["trial_id"] for r in back] == [r["trial_id"] for r in rows]
    assert back[2]["status"] == "stopped" and back[3]["map50"] is None
    assert back[1]["param.methods.fitnet"] is True and back[0]["param.student.lr"] == pytest.approx(0.001)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writer left no temp file


def test_plot_is_a_png(tmp_path):
    rows = rows_with_statuses()
    plot_front(rows, front_rows(rows), tmp_path / "p.png", {"map50": 0.8, "gflops": 6.0}, "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def brute_force_front_nd(points, maximise):
    """Point i is on the front unless some j is at least as good everywhere and better somewhere."""
    signed = np.where(maximise, -points, points)  # all minimised
    return np.array(
        [
            not any(np.all(signed[j] <= signed[i]) and np.any(signed[j] < signed[i]) for j in range(len(signed)))
            for i in range(len(signed))
        ]
    )


@pytest.mark.parametrize("seed", range(3))
def test_a_three_objective_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows = [
        {"trial_id": str(i), "status": "complete", "map50": m, "gflops": g, "latency_ms": t}
        for i, (m, g, t) in enumerate(
            zip(rng.integers(0, 10, 50) / 10, rng.integers(1, 8, 50) / 2.0, rng.integers(1, 8, 50) * 1.0)
        )
    ]
    points = np.array([[r["map50"], r["gflops"], r["latency_ms"]] for r in rows])
    expected = {r["trial_id"] for r, keep in zip(rows, brute_force_front_nd(points, [True, False, False])) if keep}
    assert {r["trial_id"] for r in front_rows(rows, ("map50", "gflops", "latency_ms"))} == expected


def test_three_objective_hypervolume_by_inclusion_exclusion():
    from rkd.search.results import hypervolume_of

    rows = [
        {"status": "complete", "map50": 0.5, "gflops": 1.0, "latency_ms": 4.0},
        {"status": "complete", "map50": 0.8, "gflops": 3.0, "latency_ms": 2.0},
        {"status": "stopped", "map50": 0.9, "gflops": 0.5, "latency_ms": 1.0},  # never counted
    ]
    ref = [0.0, 4.0, 5.0]
    # boxes [0,0.5]x[1,4]x[4,5] and [0,0.8]x[3,4]x[2,5], overlap [0,0.5]x[3,4]x[4,5]
    expected = 0.5 * 3 * 1 + 0.8 * 1 * 3 - 0.5 * 1 * 1
    assert hypervolume_of(rows, ("map50", "gflops", "latency_ms"), ref) == pytest.approx(expected)
    assert hypervolume_of(rows, ("map50", "gflops"), [0.0, 4.0]) == pytest.approx(1.8)  # the staircase above


def test_a_complete_trial_whose_kd_swamped_the_task_loss_keeps_the_warning_as_its_reason():
    from types import SimpleNamespace

    from rkd.search.rows import trial_status as _status

    warning = "nsd: its KD loss started 5.9e+04x the task loss (weights as given, kd_balance off)"
    done = SimpleNamespace(error=None, metrics={"epoch": 8, "epochs": 8, "kd_warning": warning})
    assert _status(done) == ("complete", warning)
    assert _status(SimpleNamespace(error=None, metrics={"epoch": 8, "epochs": 8})) == ("complete", None)
