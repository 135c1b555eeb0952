"""`rkd export` / `rkd predict` of scene classifiers, checked against the checkpoint model on real AID images.

The run folder is what a classification search leaves, without training: students saved
with ``save_classifier`` where a search puts them (random weights, KD parts beside them),
a ``trials.parquet`` written by ``rkd.search.results`` (accuracy in ``top1``, ``map50`` empty)
and a ``summary.json`` with ``objectives: [top1, gflops]`` and a top-1 teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from aid_images import AID, load_aid
from cli_helpers import rkd_main, rows_of
from safetensors.torch import load_file

from rkd.deploy.files import (  # noqa: I001
    CARD_FILE,
    ONNX_FILE,
    POSTPROCESS_FILE,
    PT2_FILE,
    README_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
)
from rkd.deploy.load import load_exported
from rkd.deploy.predict import CLASS_PREDICTIONS_FILE
from rkd.deploy.select import pick_trial
from rkd.models import build_classifier
from rkd.search.results import trials_table, write_parquet
from rkd.train.checkpoint import atomic_torch_save, load_classifier, save_classifier

SIZE = 96
CLASSES = ["Airport", "Beach", "Forest"]
PER_CLASS = 3

# (trial id, top-1, GFLOPs, backbone width); t_dominated is off the front (t_small is better and cheaper)
TRIALS = [
    ("t_small", 0.50, 0.10, 0.25),
    ("t_big", 0.80, 0.30, 0.5),
    ("t_dominated", 0.40, 0.20, 0.25),
]
TEACHER_TOP1 = 0.9


def model_spec(width: float) -> dict:
    return {"backbone": {"name": "convnet", "width": width}}


def make_classification_run(root: Path) -> Path:
    run = root / "runs" / "aid"
    torch.manual_seed(0)
    teacher_ckpt = run / "teacher" / "teacher.pt"
    save_classifier(teacher_ckpt, build_classifier(model_spec(1.0), len(CLASSES)), model_spec(1.0), CLASSES, SIZE)
    rows = []
    for trial_id, top1, gflops, width in TRIALS:
        ckpt = run / "ray" / "trials" / f"trial-{trial_id}" / "checkpoint_000000" / "student.pt"
        model = build_classifier(model_spec(width), len(CLASSES))
        with torch.no_grad():  # random logits are nearly flat; sharper ones make the class depend on the image
            model.fc.weight.mul_(30.0)
        save_classifier(ckpt, model, model_spec(width), CLASSES, SIZE, meta={"top1": top1})
        # SSKDNet's self-supervised branch, the KD part a distilled classifier leaves beside it
        atomic_torch_save({"branch.fc.weight": torch.randn(4, 8)}, ckpt.parent / "kd_parts.pt")
        params = {"student.model.backbone.width": width, "methods.sskd": True, "methods.sskd.weight": 0.5}
        rows.append(
            {
                "trial_id": trial_id,
                "status": "complete",
                "reason": None,
                "map50": None,
                "top1": top1,
                "gflops": gflops,
                "latency_ms": None,
                "params_m": 0.1,
                "epochs_done": 2,
                "epochs": 2,
                "kd_methods": "sskd",
                "reference": None,
                "wall_s": 1.0,
                "checkpoint": str(ckpt),
                "config_json": json.dumps(params, sort_keys=True),
                "params": params,
            }
        )
    write_parquet(trials_table(rows), run / "trials.parquet")
    teacher = {
        "checkpoint": str(teacher_ckpt),
        "score": TEACHER_TOP1,
        "gflops": 1.5,
        "params": 1,
        "source": "trained",
        "config_hash": "abc",
        "wall_s": 1.0,
        "metric": "top1",
        "top1": TEACHER_TOP1,
    }
    summary = {
        "name": "aid",
        "teacher": teacher,
        "objectives": ["top1", "gflops"],
        "trials": len(rows),
        "front": ["t_small", "t_big"],
        "knee": "t_big",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_classification_run(tmp_path_factory.mktemp("clf_run"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf_exports") / "best"
    # the default pick, best, is the highest top-1 on the front
    argv = [
        "export",
        str(run),
        "--out",
        str(out),
        "--latency-runs",
        "1",
        "--format",
        "safetensors,onnx,pt2,torchscript",
    ]
    assert rkd_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def reference(run):
    """The picked trial's checkpoint model and its logits on real AID val images, preprocessed independently."""
    model, _ = load_classifier(Path(next(r for r in rows_of(run) if r["trial_id"] == "t_big")["checkpoint"]))
    images, _ = load_aid(CLASSES, PER_CLASS, "val", SIZE)
    with torch.no_grad():
        logits = model.eval()(images).logits
    return model, images, logits


def test_pick_uses_top1(run, capsys, tmp_path):
    rows = rows_of(run)
    objectives = ("top1", "gflops")
    assert pick_trial(rows, "best", objectives=objectives)["trial_id"] == "t_big"
    assert pick_trial(rows, "best", max_gflops=0.2, objectives=objectives)["trial_id"] == "t_small"
    assert pick_trial(rows, "best", min_map=0.45, max_gflops=0.2, objectives=objectives)["trial_id"] == "t_small"
    assert pick_trial(rows, "t_dominated", objectives=objectives)["trial_id"] == "t_dominated"
    out = tmp_path / "none"
    assert rkd_main(["export", str(run), "--min-map", "0.85", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "satisfies top-1 >= 0.85" in err and "t_big (top-1 0.800" in err
    assert not out.exists()


def test_card_describes_a_classifier(exported, run):
    assert {p.name for p in exported.iterdir()} == {
        WEIGHTS_FILE,
        ONNX_FILE,
        PT2_FILE,
        TORCHSCRIPT_FILE,
        CARD_FILE,
        README_FILE,
        POSTPROCESS_FILE,
        "model_spec.json",
    }
    card = json.loads((exported / CARD_FILE).read_text())
    assert card["task"] == "classification" and card["classes"] == CLASSES
    assert card["trial"]["id"] == "t_big" and card["trial"]["on_front"] is True
    assert card["trial"]["kd_methods"] == ["sskd"] and card["trial"]["params"]["methods.sskd.weight"] == 0.5
    assert card["input"]["shape"] == ["batch", 3, SIZE, SIZE] and card["input"]["mean"] == [0.485, 0.456, 0.406]
    assert card["input"]["std"] == [0.229, 0.224, 0.225] and card["input"]["resize"].startswith(
        "resize (not letterbox)"
    )
    assert [(o["name"], o["file"], o["shape"]) for o in card["outputs"]] == [
        ("logits", f, ["batch", len(CLASSES)]) for f in (ONNX_FILE, PT2_FILE)
    ] and "boxes" not in card
    assert "normalize(resize(image, " in (exported / README_FILE).read_text()  # resized whole, no letterbox
    student = build_classifier(model_spec(0.5), len(CLASSES))
    assert card["metrics"]["top1"] == 0.80 and card["metrics"]["latency_ms"] > 0
    assert card["metrics"]["params"] == sum(p.numel() for p in student.parameters())
    assert card["metrics"]["gflops"] > 0
    teacher = card["teacher"]
    assert teacher["top1"] == TEACHER_TOP1 and teacher["metric"] == "top1"
    assert teacher["sha256"] == hashlib.sha256(Path(teacher["checkpoint"]).read_bytes()).hexdigest()


def test_safetensors_hold_the_classifier_alone(exported, run):
    state = load_file(str(exported / WEIGHTS_FILE))
    assert set(state) == set(build_classifier(model_spec(0.5), len(CLASSES)).state_dict())
    assert not any(k.startswith("branch") for k in state)


def test_safetensors_round_trip_on_aid(exported, reference):
    _, images, logits = reference
    loaded, spec = load_exported(exported)
    assert spec["kind"] == "classifier" and spec["class_names"] == CLASSES and spec["input_size"] == SIZE
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, logits, atol=1e-4, rtol=0)


def test_onnx_matches_checkpoint_on_aid(exported, reference):
    import onnxruntime as ort

    _, images, logits = reference
    session = ort.InferenceSession(str(exported / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (got,) = session.run(None, {"images": images.numpy()})  # a batch of 9: the batch axis is dynamic
    np.testing.assert_allclose(got, logits.numpy(), atol=1e-4, rtol=0)


def test_torchscript_and_pt2_match_checkpoint_on_aid(exported, reference):
    _, images, logits = reference
    program = torch.export.load(str(exported / PT2_FILE))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), logits, atol=1e-4, rtol=0)
    scripted = torch.jit.load(str(exported / TORCHSCRIPT_FILE))
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), logits, atol=1e-4, rtol=0)


def test_predict_writes_the_checkpoint_models_classes(exported, reference, tmp_path, capsys):
    _, _, logits = reference
    folder = tmp_path / "scenes"
    folder.mkdir()
    expected = {}
    for _label, name in enumerate(CLASSES):  # the images load_aid read, in its order
        for path in sorted((AID / "val" / name).glob("*.jpg"))[:PER_CLASS]:
            (folder / path.name).symlink_to(path)
            expected[path.stem] = len(expected)
    probabilities = logits.softmax(dim=-1)
    assert len(set(probabilities.argmax(dim=-1).tolist())) > 1  # the check would be weak if all were one class
    out = tmp_path / "predictions"
    assert rkd_main(["predict", str(exported), str(folder), "--out", str(out)]) == 0
    assert "9 images classified" in capsys.readouterr().out
    lines = [line.split() for line in (out / CLASS_PREDICTIONS_FILE).read_text().splitlines()]
    assert sorted(image_id for image_id, _, _ in lines) == sorted(expected)
    for image_id, class_name, probability in lines:
        row = probabilities[expected[image_id]]
        assert class_name == CLASSES[int(row.argmax())]
        assert abs(float(probability) - float(row.max())) < 1e-4
    assert [p.name for p in out.iterdir()] == [CLASS_PREDICTIONS_FILE]  # no temp file left


def test_predict_errors(exported, tmp_path, capsys):
    image = next((AID / "val" / CLASSES[0]).glob("*.jpg"))
    assert rkd_main(["predict", str(exported), str(image), "--out", str(tmp_path / "p"), "--tile", "256"]) == 2
    assert "--tile" in capsys.readouterr().err
    assert rkd_main(["predict", str(tmp_path), str(image), "--out", str(tmp_path / "p")]) == 2
    assert "model_spec.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_onnx_of_a_classifier_that_resizes_its_input_matches_eager(tmp_path):
    # resize_to is part of the network: the ONNX graph takes the data's size and upsamples inside.
    import onnxruntime

    from rkd.deploy.graphs import inference_network
    from rkd.deploy.writers import write_onnx

    torch.manual_seed(0)
    clf = build_classifier({"backbone": {"width": 0.25}, "resize_to": 64}, len(CLASSES)).eval()
    path = tmp_path / "resized.onnx"
    write_onnx(inference_network(clf, 32), 32, path, ["logits"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(None, {"images": x})
    with torch.no_grad():
        eager = clf.eval()(torch.from_numpy(x)).logits.numpy()  # the exporter restores the wrapper's train mode
    np.testing.assert_allclose(logits, eager, atol=1e-4)
