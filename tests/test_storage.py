"""Run folders on storage URIs (rkd.storage): a local S3-compatible server and file:// URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rkd import storage
from rkd.errors import RkdError


@pytest.fixture(params=["s3", "file"])
def remote(request, tmp_path) -> str:
    """A fresh storage folder, on S3 or as a file:// URI."""
    if request.param == "s3":
        return request.getfixturevalue("s3").uri(request.node.name.replace("[", "-").rstrip("]"))
    return f"file://{tmp_path / 'bucket'}"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _listing(uri: str) -> dict[str, int]:
    return {rel: size for rel, size, _ in storage._remote_files(uri)}


def test_push_and_pull_round_trip_without_temporary_files(remote, tmp_path):
    src = tmp_path / "run"
    (src / "teacher").mkdir(parents=True)
    (src / "teacher" / "teacher.pt").write_bytes(b"\x00weights" * 1000)
    (src / "summary.json").write_text('{"name": "r"}')
    (src / "ray" / "trials").mkdir(parents=True)
    (src / "ray" / "trials" / "ckpt.pt").write_bytes(b"ray's own")
    assert storage.push(src, remote, exclude=("ray",)) == 2
    assert _listing(remote) == {"teacher/teacher.pt": 8000, "summary.json": 13}  # nothing half-written left
    assert storage.push(src, remote, exclude=("ray",)) == 0  # unchanged files are not sent again
    (src / "summary.json").write_text('{"name": "r", "done": true}')
    assert storage.push(src, remote, exclude=("ray",)) == 1

    back = tmp_path / "back"
    assert storage.pull(remote, back) == 2
    assert _tree(back) == {k: v for k, v in _tree(src).items() if not k.startswith("ray/")}
    assert storage.pull(remote, back) == 0
    assert storage.pull(remote, tmp_path / "partial", exclude=("teacher",)) == 1

    storage.delete(remote)
    assert not storage.exists(remote) and storage.pull(remote, tmp_path / "gone") == 0


def test_local_copy_fetches_again_when_the_stored_file_changes(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "teacher.pt"
    src.write_bytes(b"first")
    uri = storage.join(remote, "teacher", "teacher.pt")
    assert storage.push(src, uri) == 1
    assert storage.push(src, uri) == 0  # an unchanged file is not sent again (the teacher, on every run)
    local = storage.local_copy(uri)
    assert local.read_bytes() == b"first" and str(tmp_path / "cache") in str(local)
    src.write_bytes(b"second version")
    storage.push(src, uri)
    assert storage.local_copy(uri).read_bytes() == b"second version"
    with pytest.raises(RkdError, match="no such file on the storage"):
        storage.local_copy(storage.join(remote, "teacher", "missing.pt"))
    assert storage.local_copy(storage.join(remote, "teacher", "missing.pt"), missing_ok=True) is None
    assert storage.local_copy(str(src)) == src  # a plain path is itself


def test_uri_helpers_keep_options_and_never_put_credentials_in_folder_names(s3):
    uri = s3.uri("runs")
    assert storage.join(uri, "quick", "ray").endswith(f"/runs/quick/ray?endpoint_override={s3.endpoint}&scheme=http")
    ray_path = f"{s3.bucket}/runs/quick/ray/trials/t/checkpoint_0"
    assert storage.to_uri(storage.join(uri, "quick", "ray"), ray_path) == s3.uri("runs/quick/ray/trials/t/checkpoint_0")
    assert "testing" not in storage.mirror_dir(uri).name
    assert storage.mirror_dir(uri) == storage.mirror_dir(uri) != storage.mirror_dir(s3.uri("other"))


def test_unusable_storage_is_a_clear_error(s3):
    missing_bucket = s3.uri().replace(s3.bucket, "no-such-bucket", 1)
    with pytest.raises(RkdError, match="no-such-bucket.*cannot write there"):
        storage.check_writable(missing_bucket)
    with pytest.raises(RkdError, match="not a storage location pyarrow can open"):
        storage.resolve("nosuch://bucket/runs")
    storage.check_writable(s3.uri("runs"))  # a writable one passes and leaves nothing behind
    assert s3.files("runs") == {}


def test_spec_output_dir_uri_maps_to_a_local_mirror(s3, tmp_path, monkeypatch, capsys):
    from rkd.cli import main as rkd_main
    from rkd.train.spec import load_spec

    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "cache"))
    model = {"kind": "retinanet", "backbone": {"name": "convnet", "width": 0.25, "depth": 1}, "neck": {"channels": 16}}
    doc = {
        "name": "r",
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 2, "num_val": 1, "input_size": 64},
        "teacher": {"model": model, "epochs": 1},
        "student": {"model": model, "epochs": 1},
        "output_dir": s3.uri("runs"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_spec(path)
    assert spec.run_uri == storage.join(s3.uri("runs"), "r")
    assert spec.ray_storage == storage.join(s3.uri("runs"), "r", "ray")
    assert spec.run_dir.is_relative_to(tmp_path / "cache")

    path.write_text(yaml.safe_dump({**doc, "output_dir": "nosuch://bucket/runs"}, sort_keys=False))
    assert rkd_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "spec.yaml:" in err and "nosuch://bucket/runs" in err


def test_prior_stage_is_shared_through_the_storage(s3, tmp_path, monkeypatch):
    """A prior stage trained on one node is reused, not retrained, by a node with an empty cache."""
    from rkd.distill import build_distiller
    from rkd.models import build_detector, validate_model_spec
    from rkd.train.checkpoint import save_model
    from rkd.train.prior import attach_prior_states, prepare_priors

    spec = validate_model_spec(
        {
            "kind": "retinanet",
            "boxes": "obb",
            "backbone": {"name": "convnet", "width": 0.25, "depth": 1},
            "neck": {"channels": 16},
            "head": {"convs": 1},
        }
    )
    torch.manual_seed(0)
    teacher = build_detector(spec, 2)
    save_model(tmp_path / "teacher.pt", teacher, spec, ["a", "b"], 64)
    teacher_uri = s3.uri("run", "teacher", "teacher.pt")
    storage.push(tmp_path / "teacher.pt", teacher_uri)
    data = {"format": "synthetic", "num_classes": 2, "num_train": 2, "num_val": 1, "input_size": 64, "seed": 0}
    methods = {"ds2d2": {"hf_amplifier": True, "hf_channels": 16, "prior_epochs": 1}}
    remote = s3.uri("run", "priors")

    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "node1"))
    first = prepare_priors(methods, teacher_uri, data, tmp_path / "node1" / "priors", log=lambda s: None, remote=remote)
    assert first["ds2d2"].trained and first["ds2d2"].path.startswith("s3://")
    assert list(s3.files("run", "priors")) == [Path(storage.local_copy(first["ds2d2"].path)).name]

    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "node2"))
    logs: list[str] = []
    second = prepare_priors(methods, teacher_uri, data, tmp_path / "node2" / "priors", log=logs.append, remote=remote)
    assert not second["ds2d2"].trained and second["ds2d2"].path == first["ds2d2"].path
    assert any("reusing" in line for line in logs)

    distiller = build_distiller(methods, teacher.info, teacher.info)
    attach_prior_states(distiller, {"ds2d2": second["ds2d2"].path})
    saved = torch.load(storage.local_copy(first["ds2d2"].path), weights_only=True)["state_dict"]
    loaded = distiller.components["ds2d2"].prior_stage_modules().state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
