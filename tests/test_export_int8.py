"""`rkd export --int8` on a detector trained briefly on the synthetic set: the INT8 graph is
quantised, runs in onnxruntime, keeps the float graph's mAP50 and detections, and the card says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import rkd_main
from PIL import Image
from ucas_detectors import spec, trained

from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.deploy.files import CARD_FILE, INT8_FILE, README_FILE
from rkd.search.results import trials_table, write_parquet
from rkd.train.checkpoint import save_detector
from rkd.train.evaluate import evaluate

SIZE = 128
DATA = {"format": "synthetic", "num_classes": 2, "num_train": 16, "num_val": 8, "input_size": SIZE, "seed": 3}
SPEC = spec("retinanet", "obb")


def trained_run(root: Path) -> tuple[Path, torch.nn.Module]:
    """A finished one-trial search folder whose student has learnt the synthetic objects."""
    data = validate_data_spec(DATA)
    model = trained("retinanet", "obb", collate_detection(list(build_dataset(data, "train", train=False))), steps=200)
    run = root / "runs" / "synthetic"
    ckpt = run / "ray" / "trials" / "trial-a" / "checkpoint_000000" / "student.pt"
    save_detector(ckpt, model, SPEC, ["a", "b"], SIZE)
    write_one_trial_run(run, ckpt, "map50", DATA)
    return run, model


def write_one_trial_run(run: Path, ckpt: Path, metric: str, data: dict) -> None:
    """The files of a finished one-trial search around the student checkpoint ``ckpt``."""
    row = {
        "trial_id": "a",
        "status": "complete",
        "reason": None,
        "map50": None,
        "top1": None,
        metric: 0.5,
        "gflops": 0.1,
        "params_m": 0.1,
        "epochs_done": 1,
        "epochs": 1,
        "kd_methods": "",
        "wall_s": 1.0,
        "checkpoint": str(ckpt),
        "config_json": "{}",
        "params": {},
    }
    write_parquet(trials_table([row]), run / "trials.parquet")
    (run / "summary.json").write_text(json.dumps({"name": run.name, "objectives": [metric, "gflops"]}))
    (run / "search_identity.json").write_text(json.dumps({"data": data}))


def export_int8(run: Path, out: Path) -> None:
    """``rkd export --int8`` of the run's one trial, ONNX only, calibrated on 8 training images."""
    argv = [
        "export",
        str(run),
        "--out",
        str(out),
        "--format",
        "onnx",
        "--int8",
        "--int8-images",
        "8",
        "--latency-runs",
        "2",
    ]
    assert rkd_main(argv) == 0


def top_detection(folder: Path) -> tuple[np.ndarray, str]:
    fields = (folder / "val0.txt").read_text().splitlines()[0].split()  # highest score first
    return np.array([float(v) for v in fields[:8]]).reshape(4, 2).mean(0), fields[8]


def test_int8_export_runs_in_onnxruntime_and_keeps_the_float_models_detections(tmp_path, capsys):
    run, model = trained_run(tmp_path)
    out = tmp_path / "model"
    export_int8(run, out)
    assert "INT8 (model.int8.onnx, 8 val images)" in capsys.readouterr().out

    graph = onnx.load(str(out / INT8_FILE))
    quantised_convs = {n.input[1] for n in graph.graph.node if n.op_type == "Conv"}
    weights = {t.name: t for t in graph.graph.initializer}
    dequantised = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in quantised_convs]
    assert dequantised and all(weights[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dequantised)
    assert any(n.op_type == "TopK" for n in graph.graph.node)  # decoding is still in the graph, in float

    card = json.loads((out / CARD_FILE).read_text())
    scores = card["metrics"]["int8"]["map50"]
    # the float graph's mAP is the torch model's under training's own validation
    want = evaluate(model, build_dataset(validate_data_spec(DATA), "val", train=False), 2).map
    assert scores["float_onnx"] == pytest.approx(want, abs=2e-3) and want > 0.1  # it learnt something
    assert abs(scores["int8_onnx"] - scores["float_onnx"]) < 0.1 and scores["val_images"] == 8
    assert card["files"]["int8_onnx"] == INT8_FILE and card["metrics"]["int8"]["calibration"]["images"] == 8
    readme = (out / README_FILE).read_text()
    assert f"{scores['float_onnx']:.3f}" in readme and f"{scores['int8_onnx']:.3f}" in readme

    # rkd predict --int8 finds the float graph's best object on an easy val image
    image = build_dataset(validate_data_spec(DATA), "val", train=False)[0].image
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "val0.png")
    for flag, dets in (("--backend=onnxruntime", "float"), ("--int8", "int8")):
        assert rkd_main(["predict", str(out), str(tmp_path / "val0.png"), "--out", str(tmp_path / dets), flag]) == 0
    (float_centre, float_class), (int8_centre, int8_class) = map(top_detection, (tmp_path / "float", tmp_path / "int8"))
    assert int8_class == float_class and np.abs(int8_centre - float_centre).max() < 3.0


def test_int8_needs_the_end_to_end_onnx_graph_and_a_detector(tmp_path, capsys):
    from cli_helpers import make_run

    run = make_run(tmp_path)  # a run without search_identity.json
    assert rkd_main(["export", str(run), "--out", str(tmp_path / "m"), "--int8", "--raw"]) == 2
    assert "keep onnx in --format and leave out --raw" in capsys.readouterr().err
    assert rkd_main(["export", str(run), "--out", str(tmp_path / "m"), "--int8", "--latency-runs", "1"]) == 2
    assert "search_identity.json: missing; --int8 calibrates on the run's training data" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_int8_export_of_a_scene_classifier_keeps_its_top1_on_aid(tmp_path, capsys):
    """A convnet trained briefly on three AID classes: quantised whole, scored by val top-1 in onnxruntime."""
    from rkd.data.scene_dataset import build_scene_dataset, collate_scenes, validate_scene_data_spec
    from rkd.models import build_classifier
    from rkd.train.checkpoint import save_classifier

    aid = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aid150"
    classes = ["Airport", "Beach", "Forest"]
    data = {"format": "scenes", "root": str(aid), "input_size": 96, "classes": classes, "max_per_class": 20}
    train = build_scene_dataset(validate_scene_data_spec(data), "train", train=False)
    images, labels = collate_scenes([train[i] for i in range(len(train))])
    torch.manual_seed(0)
    model_spec = {"backbone": {"name": "convnet", "width": 0.25}}
    model = build_classifier(model_spec, len(classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = torch.arange(step * 12, step * 12 + 12) % len(images)
        loss = torch.nn.functional.cross_entropy(model(images[batch]).logits, labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    run = tmp_path / "runs" / "aid"
    ckpt = run / "ray" / "trials" / "trial-a" / "checkpoint_000000" / "student.pt"
    save_classifier(ckpt, model, model_spec, classes, 96, meta={"top1": 0.5})
    write_one_trial_run(run, ckpt, "top1", data)

    out = tmp_path / "model"
    export_int8(run, out)
    assert "val top-1 in onnxruntime" in capsys.readouterr().out
    graph = onnx.load(str(out / INT8_FILE))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 5  # the whole network, not a part
    card = json.loads((out / CARD_FILE).read_text())
    section = card["metrics"]["int8"]
    assert section["metric"] == "top1" and "map50" not in section
    scores = section["top1"]
    # the float graph's top-1 is the torch model's on the same val images, preprocessed as training does
    val = build_scene_dataset(validate_scene_data_spec(data), "val", train=False)
    val_images, val_labels = collate_scenes([val[i] for i in range(len(val))])
    with torch.no_grad():
        want = float((model(val_images).logits.argmax(1) == val_labels).float().mean())
    assert scores["float_onnx"] == pytest.approx(want, abs=1e-4) and want > 0.5  # it learnt something (3 classes)
    assert abs(scores["int8_onnx"] - scores["float_onnx"]) <= 0.1 and scores["val_images"] == len(val)
    assert "val top-1, model.int8.onnx" in (out / README_FILE).read_text()
    # and rkd predict --int8 classifies with it
    folder = tmp_path / "scenes"
    folder.mkdir()
    for path in sorted((aid / "val" / classes[1]).glob("*.jpg"))[:3]:
        (folder / path.name).symlink_to(path)
    assert rkd_main(["predict", str(out), str(folder), "--out", str(tmp_path / "p"), "--int8"]) == 0
    assert len((tmp_path / "p" / "predictions.txt").read_text().splitlines()) == 3
