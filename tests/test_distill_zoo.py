"""Every detection KD method against every detector of the zoo: it distils, or it refuses up front.

For each detector variant (RetinaNet and FCOS with oriented or horizontal boxes, RetinaNet with
an angle-classification branch, Faster R-CNN) and each method with its defaults, either
``build_distiller`` refuses the pair with a SpecError naming the method and what is missing
(before any training), or one training step runs: every KD term is finite, the student and the
method's own learnable parts get gradients, and the frozen teacher gets none.
"""

from __future__ import annotations

import pytest
import torch
from detector_zoo import VARIANTS, model_spec, zoo_batch

from rkd.distill import KD_METHODS, build_distiller
from rkd.errors import SpecError
from rkd.models import build_detector

# (method, hyperparameters): defaults, plus NSD without its angle level for detectors it refuses.
CASES = [(name, {}) for name in sorted(KD_METHODS)] + [("nsd", {"angle": False})]
# What NSD's angle level (on by default) needs, by variant: the reason it is refused.
NSD_ANGLE_REFUSAL = {
    "retinanet-obb": "needs an angle classification branch (angle_bins > 0), which the student lacks",
    "fcos-obb": "needs an angle classification branch (angle_bins > 0), which the student lacks",
    "retinanet-hbb": "needs oriented boxes, but the student predicts horizontal boxes",
    "fcos-hbb": "needs oriented boxes, but the student predicts horizontal boxes",
    "faster_rcnn-hbb": "needs oriented boxes, but the student predicts horizontal boxes",
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    """``(variant, student, teacher, images, targets)``: a 2-conv 16-channel teacher, a 1-conv 8-channel student."""
    variant = request.param
    torch.manual_seed(0)
    teacher = build_detector(model_spec(variant, 16, 2), 3).eval().requires_grad_(False)
    student = build_detector(model_spec(variant, 8, 1), 3).train()
    images, targets = zoo_batch(variant)
    return variant, student, teacher, images, targets


@pytest.mark.parametrize(
    ("method", "hparams"), CASES, ids=[f"{m}{'-' + '-'.join(map(str, h)) if h else ''}" for m, h in CASES]
)
def test_method_distils_or_refuses_up_front(pair, method: str, hparams: dict) -> None:
    variant, student, teacher, images, targets = pair
    refusal = NSD_ANGLE_REFUSAL.get(variant) if method == "nsd" and hparams.get("angle", True) else None
    if refusal is not None:
        with pytest.raises(SpecError) as info:
            build_distiller({method: hparams}, student.info, teacher.info)
        assert info.value.path == method and refusal in str(info.value)
        return

    torch.manual_seed(0)
    distiller = build_distiller({method: hparams}, student.info, teacher.info).train()
    student.zero_grad(set_to_none=True)
    out = student(images, targets)
    with torch.no_grad():
        teacher_out = teacher(images)
    terms = distiller(out, teacher_out, targets, epoch=5.0)
    assert terms and all(key.startswith(f"{method}.") for key in terms)
    bad = [key for key, value in terms.items() if not torch.isfinite(value).all()]
    assert not bad, f"{variant}: non-finite KD terms {bad}"
    distiller.total(terms).backward()

    reached = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, f"{variant}: no KD gradient reached the student"
    learnable = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
    if learnable:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in learnable), (
            f"{variant}: none of {method}'s learnable parts got a gradient"
        )
    assert all(p.grad is None for p in teacher.parameters()), f"{variant}: the teacher got a gradient"
