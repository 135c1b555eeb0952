"""``rkd report``: the HTML page of a run folder, checked against independent computations."""

from __future__ import annotations

import argparse
import html
import json
import re

import pytest

from rkd.errors import RkdError
from rkd.search.report import add_commands, evaluated_points, importances, write_report
from rkd.search.results import trials_table, write_parquet

REF = 5.0  # hypervolume reference GFLOPs


def row(tid, status, map50, gflops, kd="fitnet", params=None, reason=None):
    return {
        "trial_id": tid,
        "status": status,
        "reason": reason,
        "map50": map50,
        "gflops": gflops,
        "params_m": 0.1,
        "epochs_done": 2 if status == "complete" else 1,
        "epochs": 2,
        "kd_methods": kd,
        "wall_s": 12.5,
        "checkpoint": None,
        "config_json": json.dumps(params or {}),
        "params": params or {},
    }


def fitnet(on, weight=None, width=0.25):
    params = {"methods.fitnet": on, "student.width": width}
    return params if weight is None else {**params, "methods.fitnet.weight": weight}


ROWS = [
    row("e1a0c0de", "complete", 0.30, 2.0, kd="", params=fitnet(False, width=0.5)),
    row("07b2aaaa", "complete", 0.50, 3.0, params=fitnet(True, 1.0, width=1.0)),
    row("c3d4bbbb", "failed", None, 1.0, params=fitnet(True, 9.0), reason="RuntimeError: <boom> & co"),
    row("5f00cccc", "complete", 0.45, 1.5, params=fitnet(True, 0.1)),
    row("9a9adddd", "stopped", 0.10, 1.2, kd="", params=fitnet(False), reason="stopped after 1 of 2 epochs"),
]
# Tune's trial ids are random; its trial folders number the trials in creation order (ROWS order).
# 5f00cccc finished before 07b2aaaa (trials ran concurrently); c3d4bbbb failed without reporting.
CREATED = {r["trial_id"]: i + 1 for i, r in enumerate(ROWS)}
FINISHED = {"e1a0c0de": 100.0, "07b2aaaa": 400.0, "5f00cccc": 300.0, "9a9adddd": 500.0}


def hv_by_hand(points):
    """Area dominated by (map50, gflops) points up to (0, REF): a sweep over GFLOPs."""
    pts = sorted((g, m) for m, g in points if g <= REF)
    area, best = 0.0, 0.0
    for i, (g, m) in enumerate(pts):
        best = max(best, m)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else REF
        area += best * (nxt - g)
    return area


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    write_parquet(trials_table(ROWS), run / "trials.parquet")
    summary = {
        "name": "demo",
        "teacher": {"map50": 0.7, "gflops": 4.0},
        "hypervolume_ref": [0.0, REF],
        "front": ["5f00cccc", "07b2aaaa"],
        "knee": "07b2aaaa",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    for r in ROWS:
        tid = r["trial_id"]
        d = run / "ray" / "search" / f"distill_trial_{tid}_{CREATED[tid]}_methods_fitnet=True_2026-11-22_00-10-23"
        d.mkdir(parents=True)
        if tid not in FINISHED:
            (d / "error.txt").write_text("RuntimeError")
            continue
        lines = [
            {
                "trial_id": r["trial_id"],
                "epoch": e,
                "map50": (r["map50"] or 0) * e / 2,
                "timestamp": FINISHED[r["trial_id"]] - 10 * (2 - e),
            }
            for e in (1, 2)
        ][: r["epochs_done"]]
        (d / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')
    return run


def test_report_has_every_trial_and_the_right_hypervolumes(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert (
        page.startswith("<!DOCTYPE html>")
        and "<script" not in page
        and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )  # self-contained
    for r in ROWS:
        assert r["trial_id"] in page
    assert html.escape("RuntimeError: <boom> & co") in page and "stopped after 1 of 2 epochs" in page

    table = page[page.index('<table id="hypervolume">') :]
    table = table[: table.index("</table>")]
    got = re.findall(r"<tr><td>(\d+)</td><td>([\w]+)</td><td>([0-9.e+-]+)</td></tr>", table)
    # finishing order by the last timestamp (FINISHED); c3d4bbbb reported nothing and follows
    # 07b2aaaa, the trial created just before it (not the trial-id order of trials.parquet)
    order = [tid for _, tid, _ in got]
    assert order == ["e1a0c0de", "5f00cccc", "07b2aaaa", "c3d4bbbb", "9a9adddd"]
    complete = {r["trial_id"]: (r["map50"], r["gflops"]) for r in ROWS if r["status"] == "complete"}
    seen, expected = [], []
    for tid in order:
        if tid in complete:
            seen.append(complete[tid])
        expected.append(hv_by_hand(seen))
    assert [float(v) for _, _, v in got] == pytest.approx(expected, rel=1e-9)
    # by hand once more: front (1.5 GFLOPs, 0.45), (3.0, 0.5), reference 5 GFLOPs
    assert expected[-1] == pytest.approx(0.45 * 1.5 + 0.5 * 2.0)


def test_report_plots_the_front_teacher_and_curves(run_dir):
    page = write_report(run_dir).read_text()
    assert page.count("<svg") == 3  # front, hypervolume, per-epoch curves
    assert "teacher: mAP50 0.7000" in page
    assert "<rect" in page and "e1a0c0de: mAP50 0.3000" in page  # the no-KD student, a square
    for tid in FINISHED:
        assert f"<title>{tid}</title>" in page  # one curve per trial with results
    # front: 5f00cccc (1.5, 0.45) and 07b2aaaa (3.0, 0.5); e1a0c0de is dominated; with two points
    # the knee is the most accurate one
    assert "07b2aaaa (knee)" in page and "5f00cccc (front)" in page and "e1a0c0de (front)" not in page


def test_importance_ranks_the_parameter_that_decides_map():
    rows = []
    for i in range(12):
        width = (0.25, 0.5, 1.0)[i % 3]
        noise = (i * 7919) % 13 / 13
        rows.append(
            {
                "trial_id": f"t{i}",
                "status": "complete",
                "map50": width * 0.6 + 0.01 * noise,
                "param.student.width": width,
                "param.lr": 0.001 + noise / 100,
                "param.methods.hinton.weight": None,
            }
        )
    ranked = importances(rows)
    assert ranked[0][0] == "student.width" and ranked[0][1] > 0.9
    assert dict((p, v) for p, v, _ in ranked)["lr"] < 0.3
    assert "methods.hinton.weight" not in {p for p, _, _ in ranked}  # never sampled: one group, no information


def test_curves_keep_only_evaluated_epochs():
    # eval_every 2 over 5 epochs: epoch 1 never evaluated (val_images 0), epochs 3 and 5 carry
    # the last measurement, the last epoch is always evaluated
    results = [
        {"epoch": 1, "map50": 0.0, "val_images": 0},
        {"epoch": 2, "map50": 0.2, "val_images": 8},
        {"epoch": 3, "map50": 0.2, "val_images": 8},
        {"epoch": 4, "map50": 0.3, "val_images": 8},
        {"epoch": 5, "map50": 0.35, "val_images": 8},
    ]
    assert evaluated_points(results) == [(2.0, 0.2), (4.0, 0.3), (5.0, 0.35)]


def test_a_folder_without_trials_fails_clearly(tmp_path):
    with pytest.raises(RkdError, match=r"trials\.parquet: no trials table here; is .* a search run folder"):
        write_report(tmp_path)


def test_report_without_result_files_or_summary(run_dir):
    import shutil

    shutil.rmtree(run_dir / "ray")
    (run_dir / "summary.json").unlink()
    page = write_report(run_dir).read_text()
    assert "No per-trial result files" in page and page.count("<svg") == 2


def test_the_report_command(run_dir, capsys):
    parser = argparse.ArgumentParser(prog="rkd")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run_dir)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
