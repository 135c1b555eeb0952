"""Every detection KD method at once, end to end through ``rkd train --stage all``.

One real run (subprocess, embedded Ray, synthetic data, tiny convnet RetinaNets): the teacher
trains, DS2D2's prior stage trains its high-frequency amplifier, then one student is distilled
with all eleven methods together. Each method's per-term losses must be logged in
``runs/<name>/student/metrics.parquet``, finite, and lower at the last epoch than at the first.

The run's ``output_dir`` is an S3 bucket (a local S3-compatible server), as for a multi-node
run: the stages read the teacher and the prior stage back from the bucket, and what the run
made is checked there.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

STUDENT_EPOCHS = 8

# Weights are raised above the released defaults so that the KD terms, not the GT loss, steer
# the shared student features (eleven methods pull on them at once): with the defaults several
# feature terms (ds2d2's 1e-5 explicit weights, fgd's 1e-3..5e-6) are too weak to move them
# and drift up as the GT loss reshapes the features. nsd's logit term ramps up over
# warmup_epochs by design (so it would grow at first); 0 turns the ramp off. hinton uses its
# softmax form, a KL with floor 0 (the sigmoid form is covered by the unit tests).
METHODS = {
    "fitnet": {"weight": 10.0},
    "hinton": {"weight": 10.0, "form": "softmax"},
    "nsd": {"pixel": True, "box": True, "angle": False, "warmup_epochs": 0.0, "logit_weight": 10.0, "box_weight": 10.0},
    "ds2d2": {
        "w_low": 1.0,
        "w_high": 1.0,
        "ff_weight": 10.0,
        "hf_amplifier": True,
        "hf_weight": 10.0,
        "hf_channels": 16,
        "prior_epochs": 2,
    },
    # hsm off: the mask moves weight onto the locations of largest error, which can raise the
    # mask-weighted head term while the student improves (the mask is unit-tested)
    "ifkd": {"alpha": 1.0, "beta": 5.0, "p": 1.0, "hsm": False, "prior": {"kind": "builtin"}},
    "cid": {"feat_weight": 10.0, "cls_weight": 10.0, "reg_weight": 10.0},
    "at": {},
    "fgd": {"alpha": 0.1, "beta": 0.05, "gamma": 0.05, "lambda": 5e-4},
    "frs": {"feat_weight": 0.1, "cls_weight": 1.0},
    "pkd": {},
    "cwd": {"weight": 50.0},
}
TERMS = {
    "fitnet": {"feat"},
    "hinton": {"cls"},
    "nsd": {"pixel", "logit", "box"},
    "ds2d2": {"low", "high", "ff", "hf"},
    "ifkd": {"feat", "head"},
    "cid": {"feat", "cls", "reg"},
    "at": {"attn"},
    "fgd": {"fg", "bg", "attn", "global"},
    "frs": {"feat", "cls"},
    "pkd": {"feat"},
    "cwd": {"feat"},
}


def spec(out: str) -> dict:
    def model(channels: int) -> dict:
        return {
            "kind": "retinanet",
            "backbone": {"name": "convnet", "width": 0.25},
            "neck": {"channels": channels},
            "head": {"convs": 1},
        }

    return {
        "name": "allkd",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 16, "num_val": 4, "input_size": 128, "seed": 1},
        # trained enough that its outputs are no longer the prior the student's head starts from
        "teacher": {"model": model(16), "epochs": 8, "batch_size": 8, "lr": 5e-3},
        # the weights above as given: this test is about each method's terms, not the loss balance
        "student": {
            "model": model(8),
            "epochs": STUDENT_EPOCHS,
            "batch_size": 8,
            "lr": 5e-3,
            "warmup_epochs": 0.5,
            "methods": METHODS,
            "kd_balance": {"mode": "off"},
        },
        "resources": {"workers": 1, "cpus_per_worker": 2},
        "output_dir": out,
    }


def test_every_method_through_rkd_train(tmp_path, s3, monkeypatch):
    from rkd import storage

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(s3.uri("runs"))))
    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-m", "rkd.cli", "train", str(spec_path), "--stage", "all"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    run_dir = storage.mirror_dir(s3.uri("runs")) / "allkd"  # this machine's copy of the run
    stored = s3.files("runs", "allkd")
    for name in (
        "teacher/teacher.pt",
        "teacher/teacher.json",
        "student/student.pt",
        "student/kd_parts.pt",
        "student/metrics.parquet",
        "student/student.json",
    ):
        assert stored[name] == (run_dir / name).read_bytes(), name
    assert [f for f in stored if f.startswith("priors/ds2d2-")] == [
        f"priors/{p.name}" for p in (run_dir / "priors").glob("ds2d2-*.pt")
    ]
    assert any(f.startswith("ray/student-") and f.endswith("/student.pt") for f in stored)  # Ray's checkpoints

    # DS2D2's prior stage ran once, before distillation, and its file is in the run's cache
    assert "[prior] ds2d2: trained its prior stage for 2 epochs" in out, out[-4000:]
    priors = list((run_dir / "priors").glob("ds2d2-*.pt"))
    assert len(priors) == 1

    rows = pq.read_table(run_dir / "student" / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == list(range(1, STUDENT_EPOCHS + 1))
    logged = {k for k in rows[0] if k.startswith("kd.")}
    assert logged == {f"kd.{m}.{t}" for m, terms in TERMS.items() for t in terms}
    first, last = rows[0], rows[-1]
    # the teacher's outputs were kept per input (flips only: 4 variants of 16 images) and read back
    assert last["teacher_cache_hits"] + last["teacher_cache_misses"] == 16 * STUDENT_EPOCHS
    kept = list(Path(os.environ["RKD_TEACHER_OUTPUTS"]).rglob("*.pt"))  # conftest: this test's own folder
    assert last["teacher_cache_hits"] > last["teacher_cache_misses"] == len(kept)
    # ... and what each would take was said before the student trained
    said = re.search(r"\[teacher\] outputs cache: ([\d.]+) MB per input x 16 training input\(s\) x 4 augmented", out)
    assert said and out.index(said.group(0)) < out.index("[student] epoch 1/"), out[-4000:]
    each = float(said.group(1)) * 1e6  # the maps' bytes; a file adds torch.save's framing
    assert all(each * 0.99 <= f.stat().st_size <= each * 1.05 + 16e3 for f in kept), [f.stat().st_size for f in kept]
    for name in sorted(logged):
        values = [r[name] for r in rows]
        assert all(math.isfinite(v) for v in values), (name, values)
        # frs.cls, cid.cls and ifkd.head are BCE against the teacher's sigmoid probabilities:
        # the teacher's binary entropy (a floor the student cannot go below) plus a KL part.
        # Only the KL part can shrink, so these decrease by a few percent, not by half; the
        # assertion is the same for them (strictly lower), which these settings hold with a margin.
        assert last[name] < first[name], (name, values)

    # the HF amplifier was frozen during distillation: the student's KD parts hold the cached head unchanged
    cached = torch.load(priors[0], map_location="cpu", weights_only=True)["state_dict"]
    kd_parts = torch.load(run_dir / "student" / "kd_parts.pt", map_location="cpu", weights_only=True)
    head = {
        k.removeprefix("components.ds2d2.hf_head."): v
        for k, v in kd_parts.items()
        if k.startswith("components.ds2d2.hf_head.")
    }
    assert head.keys() == cached.keys() and all(torch.equal(head[k], cached[k]) for k in cached)
