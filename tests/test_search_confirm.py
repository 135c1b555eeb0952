"""The search's confirm stage (``search.confirm``): paired gains over no-KD twins, with their intervals.

The interval arithmetic is checked against scipy's paired t test; the stage itself end to end on
the synthetic set (real Ray, real trainings, tiny budgets), including a rerun that trains only
what is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import base_spec, line_of, make_run, rkd_main, rows_of, run_cli, write
from scipy import stats

from rkd.cli import main
from rkd.deploy.select import pick_trial
from rkd.search.confirm import candidates, confirm_seeds, format_gain, paired_gain, plan_jobs, twin_params

# ---------------------------------------------------------------- interval arithmetic


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_paired_gain_is_scipys_paired_t_interval(n):
    rng = np.random.default_rng(n)
    twin = rng.uniform(0.2, 0.6, n)
    cand = twin + rng.normal(0.02, 0.03, n)
    gain = paired_gain(cand.tolist(), twin.tolist())
    ref = stats.ttest_rel(cand, twin).confidence_interval(0.95)
    d = cand - twin
    assert gain["n"] == n
    assert gain["mean"] == pytest.approx(float(np.mean(d)), abs=1e-12)
    assert gain["sd"] == pytest.approx(float(np.std(d, ddof=1)), abs=1e-12)
    assert (gain["low"], gain["high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert gain["includes_zero"] == (ref.low <= 0 <= ref.high)
    assert gain["candidate"]["mean"] == pytest.approx(float(np.mean(cand)), abs=1e-12)
    assert gain["candidate"]["std"] == pytest.approx(float(np.std(cand, ddof=1)), abs=1e-12)
    assert gain["twin"]["mean"] == pytest.approx(float(np.mean(twin)), abs=1e-12)
    assert gain["twin"]["std"] == pytest.approx(float(np.std(twin, ddof=1)), abs=1e-12)
    assert gain["candidate"]["scores"] == pytest.approx(cand.tolist())


def test_interval_excluding_zero_and_one_pair_without_interval():
    # differences 0.03, 0.04, 0.05: mean 0.04, sd 0.01, t_{0.975,2} = 4.302653 -> 0.04 +- 0.024841
    gain = paired_gain([0.53, 0.64, 0.75], [0.50, 0.60, 0.70])
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert (gain["low"], gain["high"]) == pytest.approx((0.04 - half, 0.04 + half), abs=1e-12)
    assert gain["includes_zero"] is False
    assert format_gain(gain) == "+0.040 [+0.015, +0.065]"
    one = paired_gain([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None and one["high"] is None and one["sd"] is None
    assert one["includes_zero"] is None and one["candidate"]["std"] is None
    assert format_gain(one) == "+0.100 (1 pair: no interval)"
    with pytest.raises(ValueError):
        paired_gain([0.5, 0.6], [0.4])


# ---------------------------------------------------------------- what is trained


def test_candidates_twins_and_seeds():
    def row(tid, map50, gflops, kd, **params):
        return {
            "trial_id": tid,
            "status": "complete",
            "map50": map50,
            "gflops": gflops,
            "kd_methods": kd,
            "params": params,
        }

    rows = [
        row("a", 0.40, 1.0, "", **{"student.lr": 1e-3, "methods.hinton": False}),
        row(
            "b",
            0.50,
            2.0,
            "hinton",
            **{
                "student.lr": 1e-3,
                "methods.hinton": True,
                "methods.hinton.weight": 2.0,
                "student.kd_balance.mode": "off",
            },
        ),
        row("c", 0.60, 3.0, "hinton", **{"student.lr": 1e-3, "methods.hinton": True, "methods.hinton.weight": 5.0}),
        row("d", 0.30, 3.0, "hinton", **{"student.lr": 2e-3, "methods.hinton": True}),  # dominated
    ]
    assert [r["trial_id"] for r in candidates(rows, ("map50", "gflops"), 5)] == ["c", "b"]  # "a" has no KD
    assert [r["trial_id"] for r in candidates(rows, ("map50", "gflops"), 1)] == ["c"]
    # methods in the spec's student: every trial uses KD, "a" too
    assert [r["trial_id"] for r in candidates(rows, ("map50", "gflops"), 5, spec_methods=True)] == ["c", "b", "a"]
    assert twin_params(rows[1]["params"]) == {"student.lr": 1e-3}
    assert confirm_seeds(7, 2) == [8, 9]
    jobs, pairs = plan_jobs(candidates(rows, ("map50", "gflops"), 2), [8, 9])
    # b and c share their twin (same student): 2 candidates x 2 seeds + 1 twin x 2 seeds
    assert len(jobs) == 6 and len(pairs) == 4
    assert {p["twin"] for p in pairs if p["trial_id"] == "b"} == {p["twin"] for p in pairs if p["trial_id"] == "c"}
    for p in pairs:
        assert jobs[p["kd"]]["seed"] == jobs[p["twin"]]["seed"] == p["seed"]
        assert jobs[p["kd"]]["kd"] and not jobs[p["twin"]]["kd"]
    assert plan_jobs(candidates(rows, ("map50", "gflops"), 2), [8, 9]) == (jobs, pairs)  # keys are stable


def test_candidates_spread_over_the_front_from_the_most_accurate_to_the_fewest_gflops():
    # A front of five KD points (accuracy grows with GFLOPs) and a dominated one.
    rows = [
        {"trial_id": t, "status": "complete", "top1": acc, "gflops": g, "kd_methods": "hinton", "params": {}}
        for t, acc, g in [
            ("p1", 0.80, 0.06),
            ("p2", 0.84, 0.10),
            ("p3", 0.86, 0.13),
            ("p4", 0.88, 0.20),
            ("p5", 0.89, 0.24),
            ("x", 0.81, 0.13),
        ]
    ]
    ids = lambda top: [r["trial_id"] for r in candidates(rows, ("top1", "gflops"), top)]  # noqa: E731
    assert ids(1) == ["p5"]
    assert ids(2) == ["p5", "p1"]  # the most accurate and the cheapest, not the two most accurate
    assert ids(3) == ["p5", "p3", "p1"]  # and the middle of the front by GFLOPs
    assert ids(4) == ["p5", "p4", "p2", "p1"]
    assert ids(9) == ["p5", "p4", "p3", "p2", "p1"]  # "x" is dominated by p3
    # A third objective (latency): the front is the same five points here, and the pick is too.
    rows3 = [dict(r, latency_ms=lat) for r, lat in zip(rows, [9.0, 1.0, 5.0, 2.0, 8.0, 9.5])]
    assert [r["trial_id"] for r in candidates(rows3, ("top1", "gflops", "latency_ms"), 2)] == ["p5", "p1"]
    # Three objectives, the most accurate in the middle by GFLOPs (p4, p5 stay on the front by their
    # latency): the points between are spread below it, and the rest come cheapest first.
    mid = [
        dict(r, top1=acc, latency_ms=lat)
        for r, acc, lat in zip(rows[:5], [0.80, 0.84, 0.90, 0.85, 0.86], [9, 8, 7, 1, 2])
    ]
    ids3 = lambda top: [r["trial_id"] for r in candidates(mid, ("top1", "gflops", "latency_ms"), top)]  # noqa: E731
    assert ids3(2) == ["p3", "p1"]
    assert ids3(3) == ["p3", "p2", "p1"]
    assert ids3(4) == ["p3", "p4", "p2", "p1"]  # steps at ranks 0, 1, 1: the cheapest point left, p4, makes up


# ---------------------------------------------------------------- spec validation


@pytest.mark.parametrize(
    "confirm, where, needle",
    [
        ({"top": 0, "seeds": 2}, "search.confirm.top", "must be >= 1"),
        ({"top": 1, "seeds": 1}, "search.confirm.seeds", "must be >= 2"),
        ({"top": 1.5, "seeds": 2}, "search.confirm.top", "expected an integer"),
        ({"top": 1, "seeds": 2, "sedes": 3}, "search.confirm.sedes", "unknown key"),
        ({"seeds": 2}, "search.confirm.top", "is required"),
        (3, "search.confirm", "expected a mapping"),
    ],
)
def test_bad_confirm_is_refused_with_file_and_line_before_training(tmp_path, capsys, confirm, where, needle):
    spec = base_spec(tmp_path)
    spec["search"]["confirm"] = confirm
    spec_path = write(tmp_path, spec)
    code, stderr = run_cli(capsys, "search", str(spec_path))
    assert code == 2, stderr
    key = where.rsplit(".", 1)[1]
    line = line_of(spec_path, f"{key}:") if f"{key}:" in spec_path.read_text() else line_of(spec_path, "confirm:")
    assert stderr.startswith(f"rkd: error: {spec_path}:{line}: {where}: "), stderr
    assert needle in stderr and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


# ---------------------------------------------------------------- export --pick


def _confirmed(tid: str, mean: float) -> dict:
    gain = paired_gain([mean, mean + 0.01], [mean - 0.1, mean - 0.08])
    return {
        "trial_id": tid,
        "kd_methods": "fitnet",
        "gflops": 0.0,
        "candidate": gain.pop("candidate"),
        "twin": gain.pop("twin"),
        "gain": gain,
        "seeds": [1, 2],
        "failed": [],
    }


def test_pick_best_ranks_confirmed_points_by_their_confirmed_mean(tmp_path, capsys):
    run = make_run(tmp_path)
    rows = rows_of(run)
    assert pick_trial(rows, "best")["trial_id"] == "t_big"  # the search's best single score
    # t_big's confirmed mean is below t_mid's: the confirmed ranking wins
    confirmed = [_confirmed("t_big", 0.41), _confirmed("t_mid", 0.45)]
    assert pick_trial(rows, "best", confirmed=confirmed)["trial_id"] == "t_mid"
    assert pick_trial(rows, "best", max_gflops=0.15, confirmed=confirmed)["trial_id"] == "t_small"  # none within
    assert pick_trial(rows, "knee", confirmed=confirmed)["trial_id"] == "t_mid"
    summary = json.loads((run / "summary.json").read_text())
    summary["confirm"] = {
        "top": 2,
        "seeds": 2,
        "level": 0.95,
        "metric": "map50",
        "seed_list": [1, 2],
        "points": confirmed,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "exported"
    assert rkd_main(["export", str(run), "--out", str(out), "--format", "safetensors", "--latency-runs", "1"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["trial"]["id"] == "t_mid"
    assert card["confirmed"]["candidate"]["mean"] == pytest.approx(0.455)

    # rkd results, report.html and pareto.png show the confirmed gains
    assert main(["results", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "gain over twin [95% CI]" in printed
    assert all(format_gain(p["gain"]) in printed for p in confirmed)
    assert format_gain(confirmed[0]["gain"]) == "+0.095 [+0.031, +0.159]"  # d = 0.10, 0.09; t(0.975, 1) = 12.71
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert 'id="confirm"' in page and all(format_gain(p["gain"]) in page for p in confirmed)
    from rkd.search.plot import plot_front
    from rkd.search.results import front_rows

    rows = rows_of(run)
    plot_front(rows, front_rows(rows), tmp_path / "pareto.png", None, "t", confirmed=confirmed)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- end to end


def confirm_spec(tmp: Path, seeds: int) -> Path:
    space = tmp / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "student": {"model.backbone.width": {"choices": [0.25, 0.5]}},
                "methods": {"hinton": {"weight": "default"}},
            }
        )
    )
    model = {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": 0.25, "depth": 1},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    spec = {
        "name": "confirm",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128, "seed": 3},
        "teacher": {"model": {**model, "backbone": {**model["backbone"], "width": 0.5}}, "epochs": 1, "batch_size": 4},
        "student": {"model": model, "epochs": 1, "batch_size": 4, "lr": 3e-3},
        "search": {
            "space": str(space),
            "trials": 1,
            # the smallest student, distilled: on the front whatever its mAP
            "initial_points": [{"student.model.backbone.width": 0.25, "methods.hinton": True}],
            "confirm": {"top": 1, "seeds": seeds},
        },
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "output_dir": str(tmp / "runs"),
    }
    path = tmp / f"spec{seeds}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_confirm_stage_end_to_end_and_rerun_trains_only_what_is_missing(tmp_path, capsys):
    import ray

    try:
        assert main(["search", str(confirm_spec(tmp_path, 2))]) == 0
        out = capsys.readouterr().out
        assert "[confirm] 1 front points and their no-KD twins, 2 seeds each: 4 of 4 trainings to run" in out
        run = tmp_path / "runs" / "confirm"
        summary = json.loads((run / "summary.json").read_text())
        confirm = summary["confirm"]
        assert confirm["seed_list"] == [1, 2] and confirm["metric"] == "map50"
        (point,) = confirm["points"]
        assert point["trial_id"] == summary["front"][0] and point["kd_methods"] == "hinton"
        records = {p.stem: json.loads(p.read_text()) for p in (run / "confirm").glob("*.json")}
        assert len(records) == 4 and all(r["status"] == "complete" for r in records.values())
        kd = sorted((r for r in records.values() if r["kd"]), key=lambda r: r["seed"])
        twin = sorted((r for r in records.values() if not r["kd"]), key=lambda r: r["seed"])
        assert [r["seed"] for r in kd] == [r["seed"] for r in twin] == [1, 2]
        assert twin[0]["params"] == {"student.model.backbone.width": 0.25}  # same student, KD off
        assert kd[0]["params"]["methods.hinton"] is True
        expected = paired_gain([r["score"] for r in kd], [r["score"] for r in twin])
        assert point["gain"]["mean"] == pytest.approx(expected["mean"], abs=1e-12)
        assert (point["gain"]["low"], point["gain"]["high"]) == pytest.approx((expected["low"], expected["high"]))
        assert point["candidate"]["scores"] == [r["score"] for r in kd]
        assert point["twin"]["scores"] == [r["score"] for r in twin]
        assert format_gain(point["gain"]) in out  # printed at the end of the search

        assert main(["results", str(run)]) == 0
        printed = capsys.readouterr().out
        assert "gain over twin" in printed and format_gain(point["gain"]) in printed
        assert main(["report", str(run)]) == 0
        page = (run / "report.html").read_text()
        assert 'id="confirm"' in page and format_gain(point["gain"]) in page
        assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"

        # More seeds: the search and the first two pairs are kept, only the third seed's pair trains.
        stamps = {p.name: p.stat().st_mtime_ns for p in (run / "confirm").glob("*.json")}
        assert main(["search", str(confirm_spec(tmp_path, 3))]) == 0
        out = capsys.readouterr().out
        assert "resuming" in out and "2 of 6 trainings to run" in out
        assert {p.name: p.stat().st_mtime_ns for p in (run / "confirm").glob("*.json") if p.name in stamps} == stamps
        again = json.loads((run / "summary.json").read_text())
        assert again["front"] == summary["front"]
        assert again["confirm"]["points"][0]["seeds"] == [1, 2, 3]
        assert again["confirm"]["points"][0]["candidate"]["scores"][:2] == point["candidate"]["scores"]
    finally:
        ray.shutdown()
