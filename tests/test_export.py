"""`rkd export`: trial picking, and round trips of the exported student (safetensors, ONNX, .pt2, TorchScript).

A real run folder: students saved with ``save_detector`` where a search puts
them, a ``trials.parquet`` written by ``rkd.search.results`` and a ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CLASSES, SIZE, make_run, model_spec, rkd_main, rows_of
from safetensors.torch import load_file

import rkd.cli
from rkd.deploy.export import export_student
from rkd.deploy.files import (
    CARD_FILE,
    ONNX_FILE,
    POSTPROCESS_FILE,
    PT2_FILE,
    README_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
)
from rkd.deploy.graphs import DetectionNetwork, RawNetwork, raw_output_names
from rkd.deploy.load import load_exported
from rkd.deploy.select import pick_trial
from rkd.errors import RkdError
from rkd.models import build_detector
from rkd.search.results import trials_table, write_parquet


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "best"
    assert rkd_main(["export", str(run), "--pick", "t_mid", "--out", str(out), "--latency-runs", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def exported_raw(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "raw"
    argv = [
        "export",
        str(run),
        "--pick",
        "t_mid",
        "--out",
        str(out),
        "--latency-runs",
        "1",
        "--raw",
        "--format",
        "onnx,torchscript",
    ]
    assert rkd_main(argv) == 0
    return out


def test_pick_best_and_knee_honour_constraints(run):
    rows = rows_of(run)
    assert pick_trial(rows, "best")["trial_id"] == "t_big"
    assert pick_trial(rows, "best", max_gflops=0.25)["trial_id"] == "t_mid"
    assert pick_trial(rows, "best", min_map=0.25, max_gflops=0.15)["trial_id"] == "t_small"
    assert pick_trial(rows, "knee")["trial_id"] == "t_mid"
    assert pick_trial(rows, "t_dominated")["trial_id"] == "t_dominated"  # an explicit id may be off the front


def test_pick_errors_name_the_problem(run):
    rows = rows_of(run)
    with pytest.raises(RkdError, match=r"satisfies mAP50 >= 0.55 and GFLOPs <= 0.3.*t_big \(mAP50 0.600"):
        pick_trial(rows, "best", min_map=0.55, max_gflops=0.3)
    with pytest.raises(RkdError, match="t_failed is failed"):
        pick_trial(rows, "t_failed")
    with pytest.raises(RkdError, match="no such trial"):
        pick_trial(rows, "t_nope")
    with pytest.raises(RkdError, match="t_big .* does not satisfy GFLOPs <= 0.2"):
        pick_trial(rows, "t_big", max_gflops=0.2)


def test_cli_reports_unqualified_pick_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "none"
    code = rkd_main(["export", str(run), "--min-map", "0.9", "--out", str(out)])
    assert code == 2
    assert "no complete trial on the Pareto front satisfies mAP50 >= 0.9" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_out_and_bad_formats(run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert rkd_main(["export", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert rkd_main(["export", str(run), "--out", str(tmp_path / "o"), "--format", "onnx,tflite"]) == 2
    assert "--format 'onnx,tflite'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folder left


def test_export_rejects_weights_with_kd_parts(run, tmp_path):
    rows = rows_of(run)
    # A student checkpoint that (wrongly) carries an adapter: export must not pass it on.
    import rkd.train.checkpoint as ck

    bad_run = tmp_path / "bad"
    bad_run.mkdir()
    ckpt = ck.read_checkpoint(Path(rows[0]["checkpoint"]))
    ckpt["state_dict"]["distiller.adapters.0.weight"] = torch.zeros(1)
    ck.atomic_torch_save(ckpt, bad_run / "student.pt")
    row = {**rows[0], "checkpoint": str(bad_run / "student.pt")}
    row["params"] = json.loads(row["config_json"])
    write_parquet(trials_table([row]), bad_run / "trials.parquet")
    with pytest.raises(RkdError, match="distiller.adapters.0.weight"):
        export_student(bad_run, tmp_path / "out", pick=row["trial_id"], latency_runs=1)
    assert not (tmp_path / "out").exists()


def test_exported_files_and_card(exported, run):
    names = {p.name for p in exported.iterdir()}
    assert names == {WEIGHTS_FILE, ONNX_FILE, PT2_FILE, CARD_FILE, README_FILE, POSTPROCESS_FILE, "model_spec.json"}
    card = json.loads((exported / CARD_FILE).read_text())
    assert card["trial"]["id"] == "t_mid" and card["trial"]["on_front"] is True
    assert card["classes"] == CLASSES and card["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert card["input"]["mean"] == [0.485, 0.456, 0.406] and card["boxes"]["convention"] == "le90"
    assert card["metrics"]["map50"] == 0.5 and card["metrics"]["latency_ms"] > 0
    latency = card["metrics"]["latency"]
    # the headline figure is onnxruntime's at batch 1, stated with its threads and runtime
    assert card["metrics"]["latency_ms"] == latency["onnxruntime_cpu_batch1"]["median_ms"]
    for batch in (1, 8):
        entry = latency[f"onnxruntime_cpu_batch{batch}"]
        assert entry["batch"] == batch and entry["threads"] >= 1 and entry["runtime"].startswith("onnxruntime")
    assert latency["eager_torch_cpu_batch1"]["median_ms"] > 0
    assert card["metrics"]["params"] == sum(p.numel() for p in build_detector(model_spec(0.5, "fcos"), 2).parameters())
    assert card["trial"]["params"]["methods.fitnet.weight"] == 2.0 and card["trial"]["kd_methods"] == ["fitnet"]
    teacher = Path(card["teacher"]["checkpoint"])
    import hashlib

    assert card["teacher"]["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert card["teacher"]["map50"] == 0.7 and card["rkd_version"] == rkd.__version__
    # an oriented end-to-end graph: candidates out of both files, NMS in postprocess.py
    assert [(o["name"], o["file"]) for o in card["outputs"]] == [
        (n, f) for f in (ONNX_FILE, PT2_FILE) for n in ("boxes", "scores", "labels")
    ]
    assert card["outputs"][0]["shape"] == ["batch", 512 + 128 + 32, 5]  # FCOS: every (point, class) of 16x16, 8x8, 4x4
    # the postprocessing shipped is rkd's own file, and it imports nothing but numpy
    source = (exported / POSTPROCESS_FILE).read_text()
    assert source == (Path(rkd.__file__).parent / "deploy" / POSTPROCESS_FILE).read_text()
    assert {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))} <= {
        "__future__",
        "numpy",
    }


def test_readme_card_says_what_and_how(exported):
    text = (exported / README_FILE).read_text()
    for needle in (
        "ship, plane",
        "## Input",
        "## Outputs",
        "## Metrics",
        "onnxruntime_cpu_batch8",
        "fitnet",
        "teacher.pt",
        "import numpy as np, onnxruntime as ort",
        "detections(out",
    ):
        assert needle in text, needle


def test_safetensors_hold_the_student_alone(exported, run):
    state = load_file(str(exported / WEIGHTS_FILE))
    expected = build_detector(model_spec(0.5, "fcos"), 2).state_dict()
    assert set(state) == set(expected)
    kd_keys = torch.load(Path(rows_of(run)[1]["checkpoint"]).parent / "kd_parts.pt", weights_only=True)
    assert not set(kd_keys) & set(state)
    assert not any("adapter" in k or "distill" in k for k in state)


@pytest.fixture(scope="module")
def reference(run):
    """The original student and its raw outputs on a fixed batch."""
    from rkd.train.checkpoint import load_detector

    model, _ = load_detector(Path(rows_of(run)[1]["checkpoint"]))
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = RawNetwork(model.eval())(images)
    return model, images, outs


def test_safetensors_round_trip_is_exact(exported, reference):
    model, images, outs = reference
    loaded, spec = load_exported(exported)
    assert spec["class_names"] == CLASSES and spec["input_size"] == SIZE and spec["graph"] == "end-to-end"
    with torch.no_grad():
        again = RawNetwork(loaded)(images)
    assert len(again) == len(outs)
    for a, b in zip(again, outs):
        assert torch.equal(a, b)
    p, q = model.predict(images, score_threshold=0.0), loaded.predict(images, score_threshold=0.0)
    assert all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"]) for x, y in zip(p, q))


def test_raw_onnx_matches_torch(exported_raw, reference):
    import onnx
    import onnxruntime as ort

    model, images, outs = reference
    assert {p.name for p in exported_raw.iterdir()} >= {ONNX_FILE, TORCHSCRIPT_FILE}
    assert not (exported_raw / POSTPROCESS_FILE).exists() and not (exported_raw / PT2_FILE).exists()
    proto = onnx.load(str(exported_raw / ONNX_FILE))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(exported_raw / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == raw_output_names(model.info)
    got = session.run(None, {"images": images.numpy()})  # batch 2: the batch axis is dynamic
    for a, b in zip(got, outs):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)


def test_torchscript_only_when_named_and_matches_torch(exported, exported_raw, reference):
    assert not (exported / TORCHSCRIPT_FILE).exists()
    _, images, outs = reference
    scripted = torch.jit.load(str(exported_raw / TORCHSCRIPT_FILE))
    with torch.no_grad():
        got = scripted(images)
    for a, b in zip(got, outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pt2_is_an_exported_program_with_a_dynamic_batch(exported, reference):
    model, images, _ = reference
    program = torch.export.load(str(exported / PT2_FILE))
    assert isinstance(program, torch.export.ExportedProgram)
    expected = DetectionNetwork(model, SIZE).eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got, want = program.module()(x), expected(x)
        assert got[0].shape == (batch, 672, 5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_moved_run_folder_still_exports(tmp_path):
    # A run copied home from cluster storage: the recorded checkpoint paths no longer exist.
    import shutil

    original = make_run(tmp_path / "cluster")
    moved = tmp_path / "home" / "demo"
    shutil.move(str(original), moved)
    result = export_student(moved, tmp_path / "out", pick="best", formats=["safetensors"], latency_runs=1)
    assert result.trial["trial_id"] == "t_big"
    model, _ = load_exported(result.out)
    assert sum(p.numel() for p in model.parameters()) == result.card["metrics"]["params"]
