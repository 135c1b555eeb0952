"""The openmmlab model kind in specs, in the core environment (no OpenMMLab package needed or imported)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from rkd.cli import main as rkd_main
from rkd.errors import RkdError, SpecError
from rkd.models import build_detector, validate_model_spec
from rkd.train.spec import load_spec

HAS_OPENMMLAB = importlib.util.find_spec("mmdet") is not None


def test_validation_needs_no_openmmlab_import():
    spec = validate_model_spec({"kind": "openmmlab", "config": "cfg.py", "cfg_options": {"model.backbone.depth": 18}})
    assert spec == {
        "kind": "openmmlab",
        "config": "cfg.py",
        "checkpoint": None,
        "cfg_options": {"model.backbone.depth": 18},
    }
    assert "mmdet" not in sys.modules and "mmrotate" not in sys.modules and "mmcv" not in sys.modules
    for bad, where in [
        ({"config": "cfg.yaml"}, "config"),
        ({"config": "c.py", "checkpoint": 3}, "checkpoint"),
        ({"config": "c.py", "cfg_options": [1]}, "cfg_options"),
        ({"config": "c.py", "neck": {}}, "neck"),
    ]:
        with pytest.raises(SpecError) as err:
            validate_model_spec({"kind": "openmmlab", **bad})
        assert err.value.path == where


@pytest.mark.skipif(HAS_OPENMMLAB, reason="checks the message shown when OpenMMLab is not installed")
def test_building_without_openmmlab_says_how_to_set_it_up(tmp_path):
    (tmp_path / "cfg.py").write_text("model = dict(type='RetinaNet')\n")
    with pytest.raises(RkdError, match="make openmmlab"):
        build_detector({"kind": "openmmlab", "config": str(tmp_path / "cfg.py")}, 2)


def _write(tmp_path: Path, teacher: dict, student_epochs: int = 1) -> Path:
    model = {"kind": "retinanet", "backbone": {"name": "convnet", "width": 0.25, "depth": 1}, "neck": {"channels": 16}}
    doc = {
        "name": "mm",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 2, "num_val": 1, "input_size": 64},
        "teacher": teacher,
        "student": {"model": model, "epochs": student_epochs},
    }
    path = tmp_path / "spec" / "spec.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_spec_paths_are_relative_to_the_spec_and_epochs_zero_keeps_given_weights(tmp_path, capsys):
    (tmp_path / "spec" / "cfgs").mkdir(parents=True)
    (tmp_path / "spec" / "cfgs" / "retina.py").write_text("model = dict()\n")
    (tmp_path / "spec" / "teacher.pth").write_bytes(b"")
    mm = {"kind": "openmmlab", "config": "cfgs/retina.py", "checkpoint": "teacher.pth"}
    spec = load_spec(_write(tmp_path, {"model": mm, "epochs": 0}))
    assert spec.teacher.model["config"] == str(tmp_path / "spec" / "cfgs" / "retina.py")
    assert spec.teacher.model["checkpoint"] == str(tmp_path / "spec" / "teacher.pth") and spec.teacher.epochs == 0

    # a missing config is named with its field and line; epochs 0 needs weights to keep
    cases = [
        ({"model": {**mm, "config": "cfgs/missing.py"}, "epochs": 0}, "teacher.model.config: path does not exist"),
        ({"model": {**mm, "checkpoint": None}, "epochs": 0}, "teacher.epochs: must be >= 1"),
        ({"model": {"kind": "retinanet"}, "epochs": 0}, "teacher.epochs: must be >= 1"),
    ]
    for teacher, message in cases:
        assert rkd_main(["train", str(_write(tmp_path, teacher))]) == 2
        err = capsys.readouterr().err
        assert message in err and "spec.yaml:" in err, err
    assert rkd_main(["train", str(_write(tmp_path, {"model": mm, "epochs": 0}, student_epochs=0))]) == 2
    assert "student.epochs: must be >= 1" in capsys.readouterr().err
