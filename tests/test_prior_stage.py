"""DS2D2's prior stage: trained on a real (saved) teacher over synthetic data, cached by content, frozen in use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.distill import build_distiller
from rkd.errors import RkdError
from rkd.models import build_detector, validate_model_spec
from rkd.train.checkpoint import save_detector
from rkd.train.loop import StudentWithKD, trainable_parameters
from rkd.train.prior import attach_prior_states, prepare_priors, read_prior_state

TEACHER = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 16},
    "head": {"convs": 1},
}
STUDENT = {
    "kind": "retinanet",
    "backbone": {"name": "convnet", "width": 0.25},
    "neck": {"channels": 8},
    "head": {"convs": 1},
}
DATA = {"format": "synthetic", "num_classes": 2, "num_train": 16, "num_val": 4, "input_size": 64, "seed": 3}
METHODS = {"ds2d2": {"hf_amplifier": True, "hf_channels": 16, "prior_epochs": 3, "prior_lr": 3e-3}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    torch.manual_seed(0)
    data = validate_data_spec(dict(DATA))
    model_spec = validate_model_spec(TEACHER)
    teacher = build_detector(model_spec, 2)
    path = folder / "teacher.pt"
    save_detector(path, teacher, model_spec, ["a", "b"], 64)
    return data, path, folder


def whole_set_loss(component, teacher, data) -> float:
    """The prior-stage loss over the train split, no training (an independent measure)."""
    images, targets, _ = collate_detection(list(build_dataset(data, "train", train=False)))
    with torch.no_grad():
        return float(component.prior_stage_loss(teacher(images), targets))


def test_prior_stage_trains_caches_and_reuses(setup):
    data, teacher_path, folder = setup
    cache = folder / "cache_a"
    lines: list[str] = []
    first = prepare_priors(METHODS, teacher_path, data, cache, seed=0, log=lines.append)
    assert set(first) == {"ds2d2"} and first["ds2d2"].trained
    assert len(first["ds2d2"].losses) == 3 and first["ds2d2"].losses[-1] < first["ds2d2"].losses[0]
    assert len(lines) == 1 and lines[0].startswith("[prior] ds2d2: trained its prior stage for 3 epochs")
    path = Path(first["ds2d2"].path)
    assert path.parent == cache and path.name.startswith("ds2d2-")
    blob = path.read_bytes()

    # the trained head lowers the stage's own loss against a fresh (untrained) head
    from rkd.train.checkpoint import load_detector

    teacher, _ = load_detector(teacher_path)
    teacher.eval()
    fresh = build_distiller(METHODS, teacher.info, teacher.info).components["ds2d2"]
    trained = build_distiller(METHODS, teacher.info, teacher.info).components["ds2d2"]
    trained.prior_stage_modules().load_state_dict(read_prior_state(path))
    assert whole_set_loss(trained, teacher, data) < 0.9 * whole_set_loss(fresh, teacher, data)

    # the same settings again: reused, nothing trained, the same file with the same bytes
    mtime = path.stat().st_mtime_ns
    lines.clear()
    again = prepare_priors(METHODS, teacher_path, data, cache, seed=0, log=lines.append)
    assert not again["ds2d2"].trained and again["ds2d2"].path == str(path)
    assert lines == [f"[prior] ds2d2: reusing {path} (same teacher, data and settings)"]
    assert path.read_bytes() == blob and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temp files left behind

    # hyperparameters that do not shape the head share its file; ones that do get another
    loose = {"ds2d2": {**METHODS["ds2d2"], "w_low": 1e-3, "ff_weight": 2.0}}
    assert prepare_priors(loose, teacher_path, data, cache, seed=0, log=lines.append)["ds2d2"].path == str(path)
    wider = {"ds2d2": {**METHODS["ds2d2"], "hf_channels": 24}}
    other = prepare_priors(wider, teacher_path, data, cache, seed=0, log=lines.append)["ds2d2"]
    assert other.trained and other.path != str(path)
    # no prior stage without the HF amplifier, and none for methods without one
    assert prepare_priors({"ds2d2": {"hf_amplifier": False}, "fitnet": {}}, teacher_path, data, cache) == {}


def test_corrupted_cache_is_retrained_not_crashed_on(setup):
    data, teacher_path, folder = setup
    cache = folder / "cache_b"
    path = Path(prepare_priors(METHODS, teacher_path, data, cache, log=lambda _: None)["ds2d2"].path)
    good = read_prior_state(path)
    path.write_bytes(path.read_bytes()[:100])  # torn
    with pytest.raises(RkdError, match="not a readable prior-stage file"):
        read_prior_state(path)
    lines: list[str] = []
    result = prepare_priors(METHODS, teacher_path, data, cache, log=lines.append)["ds2d2"]
    assert result.trained and result.path == str(path)
    assert "is unusable" in lines[0] and "training it again" in lines[0]
    assert lines[1].startswith("[prior] ds2d2: trained")
    retrained = read_prior_state(path)
    assert all(torch.equal(good[k], retrained[k]) for k in good)  # same seed, same data: same head
    torch.save({"kind": "something else"}, path)  # readable, but not a prior file
    assert prepare_priors(METHODS, teacher_path, data, cache, log=lambda _: None)["ds2d2"].trained


def test_loaded_hf_head_stays_frozen_while_the_student_trains(setup):
    data, teacher_path, folder = setup
    path = prepare_priors(METHODS, teacher_path, data, folder / "cache_c", log=lambda _: None)["ds2d2"].path
    from rkd.train.checkpoint import load_detector

    teacher, _ = load_detector(teacher_path)
    teacher.eval().requires_grad_(False)
    student = build_detector(validate_model_spec(STUDENT), 2)
    distiller = build_distiller(METHODS, student.info, teacher.info)
    with pytest.raises(RkdError, match=r"\['ds2d2'\] need their prior stage"):
        attach_prior_states(distiller, {})
    attach_prior_states(distiller, {"ds2d2": path})
    head = distiller.components["ds2d2"].hf_head
    cached = read_prior_state(Path(path))
    assert all(torch.equal(v, cached[k]) for k, v in head.state_dict().items())
    model = StudentWithKD(student, distiller).train()
    params = trainable_parameters(model)
    assert not {id(p) for p in head.parameters()} & {id(p) for p in params}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)  # decay would move any param it held
    before_student = [p.detach().clone() for p in student.parameters()]
    images, targets, _ = collate_detection(list(build_dataset(data, "train", train=False))[:4])
    for _ in range(3):
        with torch.no_grad():
            t_out = teacher(images)
        terms = model(images, targets, t_out, 0.0)
        assert "kd.ds2d2.hf" in terms
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert all(torch.equal(v, cached[k]) for k, v in head.state_dict().items())
    assert all(p.grad is None for p in head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_student, student.parameters()))


def test_a_run_of_another_name_copies_the_prior_stage_from_rkds_cache(setup):
    """Through the detection task, as `rkd train` and trials call it: the second run's own folder
    gets the first run's file, byte for byte, and nothing is trained."""
    from rkd.train.prior import prior_cache_dir
    from rkd.train.tasks import TASKS

    data, teacher_path, folder = setup
    task = TASKS["detection"]
    first_lines: list[str] = []
    first = task.prepare_priors(METHODS, str(teacher_path), data, folder / "run_one", 0, first_lines.append)
    assert first_lines[0].startswith("[prior] ds2d2: trained")
    first_file = Path(first["ds2d2"])
    kept = prior_cache_dir() / first_file.name
    assert kept.read_bytes() == first_file.read_bytes()
    lines: list[str] = []
    second = task.prepare_priors(METHODS, str(teacher_path), data, folder / "run_two", 0, lines.append)
    second_file = Path(second["ds2d2"])
    assert second_file.parent == folder / "run_two" and second_file.read_bytes() == first_file.read_bytes()
    assert lines == [
        f"[prior] ds2d2: copied from rkd's cache {kept} (trained by an earlier run)",
        f"[prior] ds2d2: reusing {second_file} (same teacher, data and settings)",
    ]
    # other settings shape another head: not taken from the cache
    wider = {"ds2d2": {**METHODS["ds2d2"], "hf_channels": 24}}
    lines.clear()
    task.prepare_priors(wider, str(teacher_path), data, folder / "run_two", 0, lines.append)
    assert lines[0].startswith("[prior] ds2d2: trained")
