"""`rkd search` end to end on an embedded local Ray: teacher, 2 trials, result files.

Real Ray (Train V2 + Tune), real Optuna, a real detector on tiny synthetic images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from rkd.cli import main
from rkd.search.results import front_rows, hypervolume_of

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def tiny_spec(out: Path, **teacher_extra) -> dict:
    model = lambda width, depth: {  # noqa: E731
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": width, "depth": depth},
        "neck": {"channels": 32},
        "head": {"convs": 1},
    }
    return {
        "name": "e2e",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 8, "num_val": 4, "input_size": 128, "seed": 3},
        "teacher": {"model": model(0.5, 1), "epochs": 2, "batch_size": 4, "lr": 3e-3, **teacher_extra},
        "student": {"model": model(0.5, 1), "epochs": 1, "batch_size": 4, "lr": 3e-3},
        "search": {
            "space": str(REPO / "search_spaces" / "skeleton.yaml"),
            "trials": 2,
            "objectives": ["map50", "gflops", "latency_ms"],
            # two different widths, one without and one with both KD methods
            "initial_points": [
                {"student.model.backbone.width": 0.25, "methods.fitnet": False, "methods.hinton": False},
                {"student.model.backbone.width": 0.75, "methods.fitnet": True, "methods.hinton": True},
            ],
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp / "runs")))
    code = main(["search", str(spec_path)])
    yield code, tmp, spec_path
    ray.shutdown()


def test_search_writes_trials_front_and_plot(search_run, capsys):
    code, tmp, _ = search_run
    assert code == 0
    run = tmp / "runs" / "e2e"
    trials = pq.read_table(run / "trials.parquet").to_pylist()
    assert len(trials) == 2
    for column in (
        "trial_id",
        "status",
        "map50",
        "gflops",
        "checkpoint",
        "kd_methods",
        "param.student.model.backbone.width",
    ):
        assert column in trials[0], column
    assert {t["status"] for t in trials} == {"complete"}
    by_width = {t["param.student.model.backbone.width"]: t for t in trials}
    assert set(by_width) == {0.25, 0.75}
    assert by_width[0.25]["gflops"] < by_width[0.75]["gflops"]  # FLOPs differ between widths
    assert by_width[0.25]["kd_methods"] == "" and by_width[0.75]["kd_methods"] == "fitnet,hinton"
    for t in trials:
        assert 0.0 <= t["map50"] <= 1.0
        assert Path(t["checkpoint"]).is_file()

    front = pq.read_table(run / "pareto.parquet").to_pylist()
    assert 1 <= len(front) <= 2
    assert {r["trial_id"] for r in front} <= {t["trial_id"] for t in trials}
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["source"] == "trained" and summary["teacher"]["gflops"] > 0
    assert summary["front"] == [r["trial_id"] for r in front]
    # the width-0.25 trial is the student without KD, the one the teacher's headroom is measured over
    assert summary["teacher_headroom"]["trial_id"] == by_width[0.25]["trial_id"]
    assert summary["teacher_headroom"]["headroom"] == pytest.approx(
        summary["teacher"]["map50"] - by_width[0.25]["map50"], abs=1e-12
    )
    # latency is the third objective: measured for every trial, and the front is over all three
    assert summary["objectives"] == ["map50", "gflops", "latency_ms"] and len(summary["hypervolume_ref"]) == 3
    assert all(t["latency_ms"] > 0 for t in trials)
    objectives = ("map50", "gflops", "latency_ms")
    assert [r["trial_id"] for r in front_rows(trials, objectives)] == summary["front"]
    assert summary["hypervolume"] == pytest.approx(hypervolume_of(trials, objectives, summary["hypervolume_ref"]))


def test_rerunning_a_finished_search_reuses_its_trials(search_run, capsys):
    _, tmp, spec_path = search_run
    run = tmp / "runs" / "e2e"
    before = pq.read_table(run / "trials.parquet").to_pylist()
    assert main(["search", str(spec_path)]) == 0
    assert "resuming" in capsys.readouterr().out
    after = pq.read_table(run / "trials.parquet").to_pylist()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(after) == strip(before)  # the same trials, none trained again


def test_checkpoint_holds_the_student_alone(search_run):
    from rkd.train.checkpoint import load_detector

    _, tmp, _ = search_run
    trials = pq.read_table(tmp / "runs" / "e2e" / "trials.parquet").to_pylist()
    kd_trial = next(t for t in trials if t["kd_methods"])
    model, ckpt = load_detector(Path(kd_trial["checkpoint"]))
    assert ckpt["model_spec"]["backbone"]["width"] == 0.75
    assert not any("adapter" in k for k in ckpt["state_dict"])  # KD parts are saved apart
    assert (Path(kd_trial["checkpoint"]).parent / "kd_parts.pt").is_file()


def test_teacher_below_min_map_is_refused_and_the_cached_teacher_is_reused(search_run, capsys):
    _, tmp, _ = search_run
    spec_path = tmp / "strict.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp / "runs", min_map=0.999)))
    before = (tmp / "runs" / "e2e" / "trials.parquet").stat().st_mtime_ns
    code = main(["search", str(spec_path)])
    out = capsys.readouterr()
    assert code == 2
    assert "reusing the trained teacher" in out.out  # trained once, not again
    assert "below teacher.min_map 0.999" in out.err and f"{spec_path}:" in out.err
    assert (tmp / "runs" / "e2e" / "trials.parquet").stat().st_mtime_ns == before  # no trial ran
