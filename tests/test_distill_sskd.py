"""SSKDNet: masking and shuffling, the losses against float64 references written from (S1)-(S5),
where gradients go, and that training lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch

from rkd.distill import build_distiller
from rkd.distill.classification.sskd import (
    SSKD,
    Restorer,
    lowest_score_mask,
    mask_patches,
    masked_count,
    patch_attention,
    random_permutations,
    shuffle_patches,
    to_patches,
    unshuffle_patches,
)
from rkd.errors import SpecError
from rkd.models import build_classifier
from rkd.outputs import ClassifierInfo, ClassifierOutput

INFO = ClassifierInfo(level_channels=(6, 10, 12), strides=(8, 16, 32), num_classes=5)


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_unshuffle_restores_the_shuffled_map_exactly(patch):
    torch.manual_seed(patch)
    x = torch.randn(3, 5, 8, 16)
    num = (8 // patch) * (16 // patch)
    perm = random_permutations(3, num)
    assert all(torch.equal(row.sort().values, torch.arange(num)) for row in perm)  # permutations
    shuffled = shuffle_patches(x, perm, patch)
    assert torch.equal(unshuffle_patches(shuffled, perm, patch), x)
    if num > 1:
        assert not torch.equal(shuffled, x)
    # The same multiset of patches, only moved: patch i of the output is input patch perm[b, i].
    assert torch.equal(to_patches(shuffled, patch), to_patches(x, patch)[torch.arange(3)[:, None], perm])


def test_patches_must_tile_the_map():
    with pytest.raises(ValueError, match="a 6x8 feature map cannot be cut into 4x4 patches"):
        to_patches(torch.zeros(1, 1, 6, 8), 4)


@pytest.mark.parametrize("ratio,patch", [(0.0, 2), (0.3, 2), (0.5, 1), (0.75, 4), (0.9, 1), (1.0, 2)])
def test_masking_hides_exactly_round_ratio_times_patches(ratio, patch):
    torch.manual_seed(0)
    b, c, h, w = 4, 3, 8, 8
    num = (h // patch) * (w // patch)
    expected = int(math.floor(ratio * num + 0.5))
    assert masked_count(num, ratio) == expected
    mask = lowest_score_mask(torch.rand(b, num), expected)
    assert mask.sum(1).tolist() == [expected] * b
    x = torch.randn(b, c, h, w)
    fill = torch.tensor([7.0, 8.0, 9.0])
    out = to_patches(mask_patches(x, mask, patch, fill), patch)  # (B, P, C, p, p)
    hidden = fill.view(c, 1, 1).expand(c, patch, patch)
    assert torch.equal(out[mask], hidden.expand(int(mask.sum()), c, patch, patch))
    assert torch.equal(out[~mask], to_patches(x, patch)[~mask])  # visible patches untouched


def test_background_mode_hides_the_least_salient_patches():
    deepest = torch.zeros(1, 2, 2, 2)
    deepest[0, :, 0, 1] = 3.0  # one salient quadrant
    deepest[0, :, 1, 0] = 1.0
    scores = patch_attention(deepest, (2, 2))
    assert scores.argsort(dim=1).tolist() == [[0, 3, 2, 1]]
    comp = SSKD(INFO, None, mask_mode="background", mask_ratio=0.5, patch=4)
    _, mask, _ = comp.corrupt(torch.randn(1, 6, 8, 8), deepest)  # 2x2 patch grid, 2 hidden
    assert mask.tolist() == [[True, False, False, True]]


def test_default_masking_hides_the_background():
    # The paper masks the background: with default parameters the hidden patches are the least salient ones.
    assert SSKD.params["mask_mode"].default == "background"
    deepest = torch.zeros(2, 12, 2, 2)
    deepest[0, :, 0, 0] = 5.0  # image 0: the object in the top-left quadrant
    deepest[1, :, 1, 1] = 5.0  # image 1: bottom-right
    deepest[1, :, 1, 0] = 2.0
    comp = SSKD(INFO, None, mask_ratio=0.5, patch=4)  # 2x2 patch grid on an 8x8 level 0, 2 hidden
    torch.manual_seed(0)
    _, mask, _ = comp.corrupt(torch.randn(2, 6, 8, 8), deepest)
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_restorer_sees_only_the_corrupted_map_and_must_place_patches_itself():
    # The restorer gets the masked, shuffled map and nothing else; its output is compared with F_0 as
    # it is, so the permutation is never used to put patches back (that is what it must infer).
    comp = SSKD(INFO, None, mask_ratio=0.25, patch=2).double().eval()
    torch.manual_seed(3)
    feats = [
        torch.randn(2, 6, 8, 8, dtype=torch.float64),
        torch.randn(2, 10, 4, 4, dtype=torch.float64),
        torch.randn(2, 12, 2, 2, dtype=torch.float64),
    ]
    out = ClassifierOutput(features=feats, pooled=feats[-1].mean((2, 3)), logits=torch.randn(2, 5, dtype=torch.float64))
    seen = []
    hook = comp.branch.restorer.register_forward_hook(lambda mod, args, result: seen.append((args, result)))
    torch.manual_seed(11)
    terms = comp(out, None, torch.tensor([1, 3]))
    hook.remove()
    torch.manual_seed(11)
    corrupted, _, perm = comp.corrupt(feats[0], feats[-1])
    assert len(seen) == 1 and len(seen[0][0]) == 1 and torch.equal(seen[0][0][0], corrupted)
    restored = seen[0][1]
    assert torch.allclose(terms["restore"], ((restored - feats[0]) ** 2).mean(), rtol=1e-12, atol=0)
    leaked = ((unshuffle_patches(restored, perm, 2) - feats[0]) ** 2).mean()
    assert not torch.allclose(terms["restore"], leaked)
    # and the output does not depend on anything but that map: the same input, the same output
    assert torch.equal(comp.branch.restorer(corrupted), restored)


def test_restorer_learns_to_put_shuffled_patches_back():
    # Patches whose content tells where they belong (a smooth function of position, as CNN features
    # near the borders do) can be put back from content alone: the placement step learns it.
    torch.manual_seed(0)
    c, side, patch = 4, 8, 2
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    base = torch.stack([xs, ys, xs * ys, xs**2 - ys**2])[None]  # (1, C, H, W)
    restorer = Restorer(c, patch)
    opt = torch.optim.Adam(restorer.parameters(), lr=1e-2)
    num = (side // patch) ** 2
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    try:
        for _ in range(250):
            x = base.expand(16, -1, -1, -1) * (1 + 0.1 * torch.randn(16, 1, 1, 1))
            shuffled = shuffle_patches(x, random_permutations(16, num), patch)
            loss = ((restorer(shuffled) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    mean_only = float(((base - base.mean((2, 3), keepdim=True)) ** 2).mean())  # the best position-blind answer
    assert sum(losses[-20:]) / 20 < 0.3 * mean_only, (losses[:3], losses[-3:], mean_only)


def _reference_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("fusion", [True, False])
def test_losses_match_float64_references(fusion):
    torch.manual_seed(1)
    hp = dict(mask_ratio=0.4, patch=2, temperature=3.0, restore_weight=0.7, branch_weight=1.3, distill_weight=2.0)
    hp["fusion"] = fusion
    comp = SSKD(INFO, None, **hp).double()
    b = 4
    feats = [
        torch.randn(b, 6, 8, 8, dtype=torch.float64),
        torch.randn(b, 10, 4, 4, dtype=torch.float64),
        torch.randn(b, 12, 2, 2, dtype=torch.float64),
    ]
    logits = torch.randn(b, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2])
    out = ClassifierOutput(features=feats, pooled=feats[-1].mean((2, 3)), logits=logits)
    torch.manual_seed(7)
    terms = comp(out, None, labels)

    # The same random draws again, then every quantity from the equations.
    torch.manual_seed(7)
    corrupted, mask, perm = comp.corrupt(feats[0], feats[-1])
    assert mask.sum(1).tolist() == [masked_count(16, 0.4)] * b
    restored = comp.branch.restorer(corrupted)  # no unshuffling with the true permutation
    maps = [restored]
    for stage in comp.branch.stages:
        maps.append(stage(maps[-1]))
    pooled = [m.mean(dim=(2, 3)) for m in maps]
    if fusion:
        gate = comp.branch.fusion.gate(torch.cat(pooled, 1))
        w = torch.exp(gate) / torch.exp(gate).sum(1, keepdim=True)  # (S3)
        assert torch.allclose(w.sum(1), torch.ones(b, dtype=torch.float64))
        fused = sum(w[:, i : i + 1] * comp.branch.fusion.project[i](pooled[i]) for i in range(3))
    else:
        fused = pooled[-1]
    zb = fused @ comp.branch.fc.weight.T + comp.branch.fc.bias

    ref_restore = ((restored - feats[0]) ** 2).sum() / restored.numel()  # (S1)
    pb = _reference_softmax(zb)
    ref_branch = -torch.log(pb[torch.arange(b), labels]).mean()  # (S2)
    t = 3.0
    pt, ps = _reference_softmax(zb / t), _reference_softmax(logits / t)
    ref_distill = t * t * (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean()  # (S4)

    assert set(terms) == {"restore", "branch_cls", "distill"}
    assert torch.allclose(terms["restore"], 0.7 * ref_restore, rtol=1e-10, atol=0)
    assert torch.allclose(terms["branch_cls"], 1.3 * ref_branch, rtol=1e-10, atol=0)
    assert torch.allclose(terms["distill"], 2.0 * ref_distill, rtol=1e-10, atol=0)


def test_teacher_guided_branch_term_matches_its_float64_reference():
    # (S6): with teacher_weight > 0 the branch also learns the teacher's softened predictions
    torch.manual_seed(1)
    comp = SSKD(INFO, INFO, patch=2, temperature=2.5, teacher_weight=0.6).double()
    assert comp.needs_teacher and not SSKD(INFO, INFO).needs_teacher  # default: self-distillation alone
    b = 3
    feats = [torch.randn(b, 6, 8, 8, dtype=torch.float64), torch.randn(b, 10, 4, 4, dtype=torch.float64)]
    feats.append(torch.randn(b, 12, 2, 2, dtype=torch.float64))
    out = ClassifierOutput(features=feats, pooled=feats[-1].mean((2, 3)), logits=torch.randn(b, 5, dtype=torch.float64))
    zt = torch.randn(b, 5, dtype=torch.float64)
    teacher = ClassifierOutput(features=feats, pooled=feats[-1].mean((2, 3)), logits=zt)
    labels = torch.tensor([0, 4, 2])
    torch.manual_seed(7)
    terms = comp(out, teacher, labels)
    torch.manual_seed(7)
    corrupted, _, _ = comp.corrupt(feats[0], feats[-1])
    zb, _ = comp.branch.classify(comp.branch.restorer(corrupted))
    t = 2.5
    pt, pb = _reference_softmax(zt / t), _reference_softmax(zb / t)
    ref = t * t * (pt * (torch.log(pt) - torch.log(pb))).sum(1).mean()  # (S6)
    assert set(terms) == {"restore", "branch_cls", "distill", "teacher"}
    assert torch.allclose(terms["teacher"], 0.6 * ref, rtol=1e-10, atol=0)
    # it trains the branch, never the teacher's logits
    zt.requires_grad_(True)
    comp(out, ClassifierOutput(features=feats, pooled=feats[-1].mean((2, 3)), logits=zt), labels)["teacher"].backward()
    assert zt.grad is None
    assert comp.branch.fc.weight.grad is not None and comp.branch.fc.weight.grad.abs().sum() > 0


def test_teacher_guided_branch_needs_a_teacher_and_reads_its_output():
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    with pytest.raises(SpecError, match="teacher_weight > 0 distils a teacher's predictions into the branch"):
        build_distiller({"sskd": {"teacher_weight": 1.0}}, student.info, None)
    teacher = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    d = build_distiller({"sskd": {"teacher_weight": 1.0}}, student.info, teacher.info)
    assert d.needs_teacher  # the loop runs the teacher's forward pass for this distiller
    assert not build_distiller({"sskd": {}}, student.info, teacher.info).needs_teacher
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        teacher_out = teacher(x)
    assert "sskd.teacher" in d(student(x, y), teacher_out, y)
    with pytest.raises(ValueError, match="needs the teacher's output"):
        d(student(x, y), None, y)


def test_gradients_reach_student_backbone_and_branch_never_the_teacher():
    torch.manual_seed(0)
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    teacher = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    # no warm-up: at epoch 0 it would hold the (S4) term at 0
    distiller = build_distiller({"sskd": {"warmup_epochs": 0.0}, "hinton": {}}, student.info, teacher.info)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 3])
    teacher_out = teacher(x)  # deliberately WITH grad: the distiller must cut it off
    terms = distiller(student(x, y), teacher_out, y)
    distiller.total(terms).backward()
    assert all(p.grad is None for p in teacher.parameters())
    stem = student.backbone.stages[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    # The (S4) term alone reaches the backbone through the student's logits, not the branch.
    branch_params = list(distiller.components["sskd"].branch.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in branch_params)
    student.zero_grad()
    distiller.zero_grad()
    only_distill = distiller(student(x, y), teacher_out, y)["sskd.distill"]
    only_distill.backward()
    assert student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in branch_params)


@pytest.mark.parametrize("branch_grad", ["joint", "detached"])
def test_branch_grad_decides_whether_the_branch_losses_train_the_backbone(branch_grad):
    torch.manual_seed(0)
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    distiller = build_distiller({"sskd": {"branch_grad": branch_grad}}, student.info, None)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 3])
    terms = distiller(student(x, y), None, y)
    (terms["sskd.restore"] + terms["sskd.branch_cls"]).backward()
    stem = student.backbone.stages[0][0].weight
    reached = stem.grad is not None and float(stem.grad.abs().sum()) > 0
    assert reached == (branch_grad == "joint")
    # the branch learns from them either way
    assert all(p.grad is not None for p in distiller.components["sskd"].branch.restorer.parameters())


def test_the_self_distillation_term_warms_up_after_the_balance():
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    distiller = build_distiller({"sskd": {"warmup_epochs": 4.0}}, student.info, None, balance={"mode": "off"})
    component = distiller.components["sskd"]
    assert component.ramps(1.0) == {"distill": 0.25} and component.ramps(6.0) == {"distill": 1.0}
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = student(x, y)
    torch.manual_seed(1)
    early = distiller(out, None, y, epoch=1.0)
    torch.manual_seed(1)
    late = distiller(out, None, y, epoch=6.0)
    assert float(early["sskd.distill"]) == pytest.approx(0.25 * float(late["sskd.distill"]), rel=1e-5)
    assert float(early["sskd.restore"]) == pytest.approx(float(late["sskd.restore"]), rel=1e-6)


def test_sskd_builds_without_a_teacher_and_checks_the_patch():
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=4)
    d = build_distiller({"sskd": {"patch": 4, "fusion": False}}, student.info, None)
    assert d.hparams["sskd"]["patch"] == 4 and d.components["sskd"].branch.fusion is None
    y = torch.tensor([1, 2])
    assert set(d(student(torch.randn(2, 3, 32, 32), y), None, y)) == {"sskd.restore", "sskd.branch_cls", "sskd.distill"}
    with pytest.raises(SpecError, match=r"sskd.patch: expected one of \[1, 2, 4\], got 3"):
        build_distiller({"sskd": {"patch": 3}}, student.info, None)
    coarse = ClassifierInfo(level_channels=(8, 8), strides=(16, 32), num_classes=4)
    with pytest.raises(SpecError, match="sskd: KD method 'sskd': patch 4 does not divide the level-0 map"):
        build_distiller({"sskd": {"patch": 4}}, coarse, None)


def test_training_a_tiny_classifier_lowers_the_sskd_loss():
    # The (S4) term can rise for a while (the branch grows confident before the backbone follows),
    # so compare the mean of the first and last ten steps.
    torch.manual_seed(0)
    student = build_classifier({"backbone": {"width": 0.25}}, num_classes=3)
    distiller = build_distiller({"sskd": {"mask_ratio": 0.25}}, student.info, None)
    params = list(student.parameters()) + list(distiller.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    history = []
    for _ in range(60):
        out = student(x, y)
        loss = distiller.total(distiller(out, None, y))
        opt.zero_grad()
        (loss + out.losses["cls"]).backward()
        opt.step()
        history.append(float(loss.detach()))
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.75 * first, (first, last)
