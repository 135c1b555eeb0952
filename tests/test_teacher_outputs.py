"""The teacher-output cache: every KD method computes the same losses from kept outputs as from a live
teacher (to half-precision rounding), keys follow the input pixels, two-stage teachers stay live."""

from __future__ import annotations

import pytest
import torch
from detector_zoo import VARIANTS, model_spec
from detector_zoo import zoo_batch as batch

from rkd.data.dataset import pixel_key
from rkd.distill import KD_METHODS, build_distiller
from rkd.errors import SpecError
from rkd.models import build_detector
from rkd.train.teacher_outputs import (
    TeacherOutputCache,
    augmented_variants,
    cache_dir,
    cache_refusal,
    input_bytes,
    keeps_outputs,
    readable_size,
    size_line,
)

ONE_STAGE = sorted(v for v in VARIANTS if not v.startswith("faster_rcnn"))
CASES = [(name, {}) for name in sorted(KD_METHODS)] + [("nsd", {"angle": False})]


def kd_terms(method, hparams, student, teacher_out, images, targets):
    torch.manual_seed(0)
    distiller = build_distiller({method: hparams}, student.info, teacher_out.info).train()
    torch.manual_seed(1)
    return distiller(student(images, targets), teacher_out, targets, epoch=5.0)


@pytest.mark.parametrize("variant", ONE_STAGE)
def test_every_method_computes_the_same_losses_from_kept_outputs(variant):
    torch.manual_seed(0)
    teacher = build_detector(model_spec(variant, 16, 2), 3).eval().requires_grad_(False)
    student = build_detector(model_spec(variant, 8, 1), 3).train()
    images, targets = batch(variant)
    cache = TeacherOutputCache("t" * 64, 96, limit_bytes=1e9)
    keys = ["a" * 32, "b" * 32]
    with torch.no_grad():
        live = cache.outputs(teacher, images, keys)  # a miss: computed, then kept
        kept = cache.outputs(teacher, images, keys)
    assert (cache.misses, cache.hits) == (2, 2) and kept is not live  # samples
    for name in ("features", "cls_logits", "box_regs"):
        for a, b in zip(getattr(live, name), getattr(kept, name)):
            # computed or read back, the same values: results do not depend on what was kept before
            assert b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(a, a.half().float())
    checked = 0
    for method, hparams in CASES:
        try:
            want = kd_terms(method, hparams, student, live, images, targets)
        except SpecError:
            continue  # the method refuses this pair up front (tests/test_distill_zoo.py)
        got = kd_terms(method, hparams, student, kept, images, targets)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=2e-2, atol=1e-3, msg=f"{variant} {key}")
        checked += 1
    assert checked >= len(KD_METHODS) - 2


def frozen_teacher(variant):
    """A frozen zoo teacher, its batch's images and an empty cache at the batch's input size."""
    torch.manual_seed(0)
    teacher = build_detector(model_spec(variant, 16, 2), 3).eval().requires_grad_(False)
    return teacher, batch(variant)[0], TeacherOutputCache("t" * 64, 96, limit_bytes=1e9)


def test_a_two_stage_teacher_is_never_kept():
    teacher, images, cache = frozen_teacher("faster_rcnn-hbb")
    with torch.no_grad():
        for _ in range(2):
            assert cache.outputs(teacher, images, ["a" * 32, "b" * 32]).rois
    assert (cache.hits, cache.misses) == (0, 2) and not list(cache_dir().rglob("*.pt"))


def test_a_changed_input_or_teacher_misses_and_the_limit_stops_writing():
    torch.manual_seed(0)
    teacher = build_detector(model_spec("retinanet-obb", 16, 2), 3).eval().requires_grad_(False)
    images, _ = batch("retinanet-obb")
    pixels = (images * 40 + 128).clamp(0, 255).to(torch.uint8)
    keys = [pixel_key(p) for p in pixels]
    changed = pixels.clone()
    changed[1, 0, 0, 0] += 1
    assert pixel_key(changed[0]) == keys[0] and pixel_key(changed[1]) != keys[1]
    cache = TeacherOutputCache("t" * 64, 96, limit_bytes=1e9)
    other = images.clone()
    other[1] = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache.outputs(teacher, images, keys)
        # one sample new: it alone is computed (on its own), the other read back
        mixed = cache.outputs(teacher, other, [keys[0], pixel_key(changed[1])])
        live = teacher(other)
        assert (cache.hits, cache.misses) == (1, 3)
        for a, b in zip(live.features + live.cls_logits, mixed.features + mixed.cls_logits):
            torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
        other_teacher = TeacherOutputCache("u" * 64, 96, limit_bytes=1e9)
        other_teacher.outputs(teacher, images, keys)
        assert other_teacher.misses == 2
        small = TeacherOutputCache("v" * 64, 96, limit_bytes=1.0)  # full after its first entry
        small.outputs(teacher, images, keys)
    assert small.full and len(list(small.folder.glob("*/*.pt"))) == 1


def test_continuous_augmentations_turn_the_cache_off():
    assert cache_refusal({"flip": True, "rot90": True, "scale": None, "color": 0.0}) is None
    assert "augment.scale" in cache_refusal({"scale": [0.5, 1.5]})
    assert "augment.color" in cache_refusal({"color": 0.2})


def test_only_a_training_that_keeps_teacher_outputs_hashes_its_samples():
    from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
    from rkd.train.config import LoopConfig, make_loop_config
    from rkd.train.tasks import TASKS

    data = {"format": "synthetic", "num_classes": 2, "num_train": 2, "num_val": 1, "input_size": 64}
    train_set = build_dataset(validate_data_spec(data), "train", train=False)
    samples = [train_set[i] for i in range(2)]
    assert all("pixels" not in meta for meta in collate_detection(samples)[2])
    keyed = collate_detection(samples, keyed=True)[2]
    assert [meta["pixels"] for meta in keyed] == [pixel_key(s.image) for s in samples]

    def keeps(methods, mode="auto", teacher="teacher.pt", augment=None, task="detection"):
        cfg = make_loop_config(
            {**data, "augment": augment or {}},
            {"model": {}, "epochs": 1, "batch_size": 2, "lr": 1e-3, "methods": methods},
            0,
            1,
            teacher,
            teacher_cache={"mode": mode},
            task=task,
        )
        return keeps_outputs(LoopConfig.from_dict(cfg), TASKS[task].caches_teacher_outputs)

    assert keeps({"hinton": {}})
    assert not keeps({})  # no KD method reads the teacher
    assert not keeps({"hinton": {}}, mode="off")
    assert not keeps({"hinton": {}}, teacher=None)
    assert not keeps({"hinton": {}}, augment={"scale": [0.5, 1.5]})
    assert not keeps({"hinton": {}}, task="classification")  # its teacher is live


def test_the_cache_size_is_said_before_it_is_built():
    teacher, images, cache = frozen_teacher("retinanet-obb")
    with torch.no_grad():
        cache.outputs(teacher, images, ["a" * 32, "b" * 32])
    kept = torch.load(cache.entry("a" * 32), weights_only=True)
    stored = sum(t.numel() * t.element_size() for levels in kept.values() for t in levels)
    assert input_bytes(teacher, 96) == stored  # what one kept entry holds, to the byte
    assert [augmented_variants({"flip": f, "rot90": r}) for f, r in ((0, 0), (1, 0), (0, 1), (1, 1))] == [1, 4, 4, 8]
    line = size_line(teacher, 96, 100, {"flip": True, "rot90": False}, limit_gb=1.0)
    assert f"{stored / 1e6:.3g} MB per input x 100 training input(s) x 4 augmented variant(s)" in line
    assert f"about {readable_size(stored * 400)} at most in" in line and "limit 1 GB" in line
    over = size_line(teacher, 96, 100, {"flip": True, "rot90": False}, limit_gb=stored * 10 / 1e9)
    assert "over the" in over and "about 10 of these 400 augmented inputs are kept" in over, over
    assert size_line(teacher, 96, 100, {"scale": [0.5, 1.5]}, 1.0).startswith("not kept: data.augment.scale")
    two_stage = build_detector(model_spec("faster_rcnn-hbb", 16, 2), 3)
    assert "two-stage" in size_line(two_stage, 96, 100, {}, 1.0)


def test_rkd_cache_lists_and_prunes_the_kept_outputs(capsys):
    from rkd.cli import main

    teacher, images, cache = frozen_teacher("retinanet-obb")
    with torch.no_grad():
        cache.outputs(teacher, images, ["a" * 32, "b" * 32])
    size = sum(f.stat().st_size for f in cache_dir().rglob("*.pt")) / 1e6
    assert main(["cache", "ls"]) == 0
    assert f"teacher outputs of 2 input(s), {size:.1f} MB, in {cache_dir()}" in capsys.readouterr().out
    assert main(["cache", "prune", "--outputs", "--all"]) != 0
    assert "takes nothing" in capsys.readouterr().err
    assert main(["cache", "prune", "--outputs"]) == 0
    assert "deleted the kept teacher outputs of 2 input(s)" in capsys.readouterr().out
    assert not list(cache_dir().rglob("*.pt"))


def test_teacher_cache_settings_are_read_and_checked(tmp_path):
    from rkd.train.spec import load_spec

    model = "{kind: retinanet, backbone: {name: convnet, width: 0.5}}"
    data = "{format: synthetic, num_classes: 2, num_train: 4, num_val: 2, input_size: 128}"

    def spec(teacher_extra: str):
        path = tmp_path / "spec.yaml"
        path.write_text(
            f"name: t\ndata: {data}\nteacher: {{model: {model}, epochs: 1{teacher_extra}}}\n"
            f"student: {{model: {model}, epochs: 1}}\n"
        )
        return load_spec(path)

    assert spec("").teacher_cache == {"mode": "auto", "limit_gb": 20.0}
    assert spec(", cache: off, cache_gb: 2").teacher_cache == {"mode": "off", "limit_gb": 2.0}
    with pytest.raises(SpecError) as err:
        spec(", cache: always")
    assert err.value.path == "teacher.cache" and "spec.yaml:3" in str(err.value), str(err.value)
