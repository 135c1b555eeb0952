"""`task: classification` end to end on real AID scenes: `rkd search` (teacher once, 2 trials on
Ray Tune + Train, top-1 against GFLOPs) and `rkd train` (a student distilled with SSKD)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from aid_images import AID

from rkd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AID.is_dir(), reason="../shared/data/aid150 not present")]

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Beach", "Forest", "Airport"]


def classifier(width: float) -> dict:
    return {"kind": "classifier", "backbone": {"name": "convnet", "width": width}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    spec = {
        "name": "scenes",
        "task": "classification",
        "data": {"format": "scenes", "root": str(AID), "classes": CLASSES, "max_per_class": 4, "input_size": 64},
        "teacher": {"model": classifier(0.5), "epochs": 2, "batch_size": 4, "lr": 3e-3},
        "student": {
            "model": classifier(0.25),
            "epochs": 1,
            "batch_size": 4,
            "lr": 3e-3,
            "methods": {"sskd": {"mask_ratio": 0.25}},
        },
        "search": {
            "space": str(REPO / "search_spaces" / "sskd.yaml"),
            "trials": 2,
            "initial_points": [
                {
                    "student.model.backbone.width": 0.25,
                    "methods.sskd": False,
                    "methods.dkd": False,
                    "methods.hinton": False,
                },
                {
                    "student.model.backbone.width": 0.5,
                    "methods.sskd": True,
                    "methods.dkd": True,
                    "methods.hinton": False,
                },
            ],
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "output_dir": str(tmp / "runs"),
    }
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    code = main(["search", str(spec_path)])
    yield code, tmp / "runs" / "scenes", spec_path
    ray.shutdown()


def test_a_classification_search_fronts_top1_against_gflops(run, capsys):
    code, run_dir, _ = run
    assert code == 0
    trials = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["complete", "complete"], [t["reason"] for t in trials]
    by_width = {t["param.student.model.backbone.width"]: t for t in trials}
    assert by_width[0.25]["kd_methods"] == "" and by_width[0.5]["kd_methods"] == "dkd,sskd"
    assert by_width[0.25]["gflops"] < by_width[0.5]["gflops"]
    for t in trials:
        assert 0.0 <= t["top1"] <= 1.0 and t["map50"] is None  # the classifier's accuracy, under its own name
        assert Path(t["checkpoint"]).is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objectives"] == ["top1", "gflops"] and summary["teacher"]["metric"] == "top1"
    assert 0.0 <= summary["teacher"]["top1"] <= 1.0
    # the width-0.25 point has every KD method off: the student alone the teacher is compared with
    headroom = summary["teacher_headroom"]
    assert headroom["trial_id"] == by_width[0.25]["trial_id"] and headroom["student_alone"] == by_width[0.25]["top1"]
    assert headroom["headroom"] == pytest.approx(summary["teacher"]["top1"] - by_width[0.25]["top1"], abs=1e-12)
    assert main(["results", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "teacher: top-1 " in out and "top-1" in out.splitlines()[3]
    assert f"teacher headroom {headroom['headroom']:+.3f} top-1" in out.splitlines()[1]
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "Parameter importance for top-1" in page and "Teacher: top-1 " in page and "mAP50" not in page
    assert f"Teacher headroom {headroom['headroom']:+.3f} top-1" in page


def test_rkd_train_distils_a_classifier_with_sskd_from_the_cached_teacher(run, capsys):
    _, run_dir, spec_path = run
    assert main(["train", str(spec_path), "--stage", "student"]) == 0
    out = capsys.readouterr().out
    assert "reusing the trained teacher" in out and "[student] top-1 " in out
    student = json.loads((run_dir / "student" / "student.json").read_text())
    assert student["metric"] == "top1" and student["methods"] == ["sskd"] and 0.0 <= student["top1"] <= 1.0
    metrics = pq.read_table(run_dir / "student" / "metrics.parquet").to_pylist()
    kd_terms = [k for k in metrics[-1] if k.startswith("kd.sskd.")]
    assert kd_terms and all(metrics[-1][k] == metrics[-1][k] for k in kd_terms)  # logged and finite (not NaN)
