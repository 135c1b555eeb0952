"""KD loss balance (rkd.distill.balance) and the epoch value the training loop hands the components.

The balance's scales are checked against a float64 reference of the rule in the module doc:
``s_m = ratio / mean_{first steps}(L_m / L_task)``, frozen after the window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import make_info, make_output, make_targets

from rkd.distill import KD_METHODS, build_distiller
from rkd.distill.balance import LossBalance, build_balance, check_balance
from rkd.errors import SpecError
from rkd.schema import Section
from rkd.train.loop import epoch_progress
from rkd.train.spec import STUDENT_KEYS, _train_config

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


def test_scales_follow_the_float64_rule_and_freeze_after_the_window():
    rng = np.random.default_rng(0)
    kd = rng.uniform(1e-3, 1e4, size=(7, 2))  # two methods, seven steps, ratios over 7 decades
    task = rng.uniform(0.5, 3.0, size=7)
    balance = LossBalance(["a", "b"], ratio=0.7, steps=4)
    for step in range(7):
        balance.observe(
            {"a": torch.tensor(kd[step, 0], dtype=torch.float32), "b": torch.tensor(kd[step, 1], dtype=torch.float32)},
            torch.tensor(task[step]),
        )
        seen = min(step + 1, 4)
        expected = 0.7 / (kd[:seen] / task[:seen, None]).mean(axis=0)
        got = balance.scales()
        np.testing.assert_allclose([got["a"], got["b"]], expected, rtol=1e-6)
    assert not balance.calibrating and int(balance.seen) == 4


def test_with_every_the_scale_is_re_measured_and_moves_halfway_to_the_new_ratio():
    kd = [4.0, 2.0, 9.0, 9.0, 9.0, 50.0, 50.0, 50.0]  # ratios to a task loss of 1; the term grows later
    balance = LossBalance(["a"], ratio=1.0, steps=2, every=3)
    expected, current = [], 0.0
    for step, value in enumerate(kd):
        balance.observe({"a": torch.tensor(value)}, torch.tensor(1.0))
        if step < 2:
            current = float(np.mean(kd[: step + 1]))  # the first window: its mean
        elif step % 3 == 0:
            current = 0.5 * current + 0.5 * value  # steps 3 and 6 are measured again
        expected.append(1.0 / current)
        assert balance.scales()["a"] == pytest.approx(expected[-1], rel=1e-12), step
    assert balance.start_ratios() == {"a": pytest.approx(3.0)}  # the first window's mean stays on record
    assert int(balance.step) == len(kd)


def test_auto_balance_puts_each_method_at_the_ratio_of_the_task_loss_on_the_first_step():
    info = make_info()
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    targets = make_targets()
    torch.manual_seed(0)  # the same adapter weights in both distillers
    distiller = build_distiller({"fitnet": {"weight": 1e4}, "hinton": {}}, info, info, balance={"ratio": 0.5}).train()
    torch.manual_seed(0)
    raw = build_distiller({"fitnet": {"weight": 1e4}, "hinton": {}}, info, info)(student, teacher, targets)
    task = torch.tensor(2.0)
    terms = distiller(student, teacher, targets, task_loss=task)
    assert float(terms["fitnet.feat"]) == pytest.approx(0.5 * 2.0, rel=1e-5)
    assert float(terms["hinton.cls"]) == pytest.approx(0.5 * 2.0, rel=1e-5)
    # the gradient is the raw term's, scaled: the balance never changes the direction
    g_bal = torch.autograd.grad(terms["fitnet.feat"], student.features[0], retain_graph=True)[0]
    g_raw = torch.autograd.grad(raw["fitnet.feat"], student.features[0])[0]
    scale = 1.0 / float(raw["fitnet.feat"].detach())
    torch.testing.assert_close(g_bal, g_raw * scale, rtol=1e-4, atol=1e-9)


def test_auto_balance_by_gradient_gives_each_method_ratio_times_the_task_gradient_on_the_student():
    info = make_info()
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    targets = make_targets()
    leaves = [*student.features, *student.cls_logits]  # stand-ins for the student's parameters
    distiller = build_distiller({"fitnet": {"weight": 1e4}, "hinton": {}}, info, info, balance={"ratio": 0.3}).train()
    distiller.balance.watch(leaves)
    task = sum((f.double() ** 2).mean() for f in student.features).float() + student.cls_logits[0].mean()
    terms = distiller(student, teacher, targets, task_loss=task)

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        return float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None)))

    for name in ("fitnet.feat", "hinton.cls"):
        assert norm(terms[name]) == pytest.approx(0.3 * norm(task), rel=1e-4), name
    # the value is not what is balanced: fitnet's value is far from 0.3 x the task loss here
    assert abs(float(terms["fitnet.feat"]) / float(task) - 0.3) > 0.05


def test_balance_off_keeps_the_weights_and_names_a_dominating_method():
    info = make_info()
    student, teacher = make_output(info), make_output(info, gen=torch.Generator().manual_seed(1))
    targets = make_targets()
    methods = {"fitnet": {"weight": 10.0}}
    torch.manual_seed(0)
    off = build_distiller(methods, info, info, balance={"mode": "off"}).train()
    torch.manual_seed(0)
    raw = build_distiller(methods, info, info)(student, teacher, targets)
    terms = off(student, teacher, targets, task_loss=torch.tensor(1e-3))
    assert float(terms["fitnet.feat"]) == pytest.approx(float(raw["fitnet.feat"]))
    ratio = float(raw["fitnet.feat"]) / 1e-3
    assert ratio > 100
    assert off.balance.warnings() == [
        f"fitnet: its KD loss started {ratio:.3g}x the task loss (weights as given, kd_balance off)"
    ]


def test_scales_survive_a_state_dict_round_trip_and_eval_does_not_measure():
    info = make_info()
    student, teacher = make_output(info), make_output(info, gen=torch.Generator().manual_seed(1))
    targets = make_targets()
    torch.manual_seed(0)
    first = build_distiller({"fitnet": {}}, info, info, balance={"steps": 2}).train()
    first(student, teacher, targets, task_loss=torch.tensor(3.0))
    second = build_distiller({"fitnet": {}}, info, info, balance={"steps": 2}).eval()
    second.load_state_dict(first.state_dict())
    second(student, teacher, targets, task_loss=torch.tensor(100.0))  # eval: not a training step
    assert second.balance.scales() == pytest.approx(first.balance.scales())
    assert int(second.balance.seen) == 1


def test_kd_balance_spec_section_is_validated_with_its_path():
    model = {"kind": "retinanet", "boxes": "obb", "backbone": {"name": "convnet", "width": 0.25}}
    ok = _train_config(
        Section({"model": model, "kd_balance": {"ratio": 2}}, "student"), STUDENT_KEYS, {"epochs": 1, "lr": 1e-3}
    )
    assert ok.kd_balance == {"mode": "auto", "ratio": 2.0, "steps": 10, "every": 0}
    with pytest.raises(SpecError, match=r"student\.kd_balance\.mode: expected one of \['auto', 'off'\]"):
        _train_config(
            Section({"model": model, "kd_balance": {"mode": "none"}}, "student"),
            STUDENT_KEYS,
            {"epochs": 1, "lr": 1e-3},
        )
    with pytest.raises(SpecError, match=r"student\.kd_balance\.ratio: must be >= 1e-06"):
        _train_config(
            Section({"model": model, "kd_balance": {"ratio": 0}}, "student"), STUDENT_KEYS, {"epochs": 1, "lr": 1e-3}
        )
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        check_balance({"steps": 0})


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 10])
def test_epoch_progress_is_epochs_done_not_the_fraction_of_the_run(steps_per_epoch):
    # Before the fix the loop passed epoch + step / total_steps: with 12 epochs NSD's warm-up
    # min(epoch / 3, 1) rose only from 0 to 0.028 during epoch 1 instead of from 0 to 0.33.
    epochs = 12
    values = [epoch_progress(step, steps_per_epoch) for step in range(epochs * steps_per_epoch)]
    for epoch in range(epochs):
        inside = values[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        assert inside[0] == pytest.approx(epoch)
        assert max(inside) < epoch + 1
    last_of_first = values[steps_per_epoch - 1]
    assert min(last_of_first / 3, 1) == pytest.approx((steps_per_epoch - 1) / steps_per_epoch / 3)


def test_a_spec_error_raised_in_a_worker_reaches_the_driver_intact():
    # A method refused inside a Ray worker is pickled back to the driver; SpecError's two-argument
    # constructor made unpickling fail and hid the reason behind a TypeError.
    import pickle

    err = SpecError("nsd.angle", "needs an angle classification branch", "spec.yaml", 12)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SpecError and str(back) == "spec.yaml:12: nsd.angle: needs an angle classification branch"


def test_a_warm_up_multiplies_its_term_after_the_balance_which_measures_it_at_full_strength():
    # NSD's logit term ramps up over warmup_epochs. Balanced on its ramped value, a term measured at a
    # tenth of its strength would pull ten times `ratio` once the warm-up ends.
    info = make_info()
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    targets = make_targets()
    parts = {"pixel": False, "box": False, "angle": False}
    ramped = build_distiller({"nsd": {**parts, "warmup_epochs": 3.0}}, info, info, balance={"steps": 1}).train()
    flat = build_distiller({"nsd": {**parts, "warmup_epochs": 0.0}}, info, info, balance={"steps": 1}).train()
    task = torch.tensor(2.0)
    early = ramped(student, teacher, targets, epoch=0.3, task_loss=task)  # ramp 0.1, in the balance's window
    full = flat(student, teacher, targets, epoch=0.3, task_loss=task)
    assert ramped.balance.scales()["nsd"] == pytest.approx(flat.balance.scales()["nsd"], rel=1e-6)
    share = KD_METHODS["nsd"].balance_share  # ratio 1 x share x the task loss (value rule)
    assert float(full["nsd.logit"]) == pytest.approx(share * 2.0, rel=1e-5)
    assert float(early["nsd.logit"]) == pytest.approx(0.1 * share * 2.0, rel=1e-5)
    after = ramped(student, teacher, targets, epoch=3.0, task_loss=task)
    assert float(after["nsd.logit"]) == pytest.approx(share * 2.0, rel=1e-5)


def test_a_methods_balance_share_sets_its_pull_against_the_others(monkeypatch):
    # A method declaring share 0.1 (as SSKD does; here NSD, so that both are detection methods) beside
    # Hinton KD's 1: with ratio 0.5 they start at 0.05 and 0.5 x the task loss.
    monkeypatch.setattr(KD_METHODS["nsd"], "balance_share", 0.1)
    info = make_info()
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    methods = {"nsd": {"pixel": False, "box": False, "angle": False, "warmup_epochs": 0.0}, "hinton": {}}
    distiller = build_distiller(methods, info, info, balance={"ratio": 0.5, "steps": 1}).train()
    terms = distiller(student, teacher, make_targets(), task_loss=torch.tensor(2.0))
    assert distiller.balance.shares == {"nsd": 0.1, "hinton": 1.0}
    assert float(terms["nsd.logit"]) == pytest.approx(0.05 * 2.0, rel=1e-5)
    assert float(terms["hinton.cls"]) == pytest.approx(0.5 * 2.0, rel=1e-5)


@pytest.mark.parametrize("part_balance", [True, False])
def test_nsd_parts_are_balanced_one_by_one_or_together(part_balance):
    # With part_balance each enabled part starts at ratio x share / parts of the task loss (value rule:
    # no parameters watched); without it the parts keep their weights' proportions, summing to ratio x share.
    info = make_info()
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    hp = {"pixel": True, "box": True, "angle": False, "warmup_epochs": 0.0, "fg_weight": 1.0}
    hp["part_balance"] = part_balance
    share = KD_METHODS["nsd"].balance_share
    torch.manual_seed(0)  # the same adapters in both distillers
    raw = build_distiller({"nsd": hp}, info, info).train()(student, teacher, make_targets())
    torch.manual_seed(0)
    distiller = build_distiller({"nsd": hp}, info, info, balance={"steps": 1}).train()
    terms = distiller(student, teacher, make_targets(), task_loss=torch.tensor(2.0))
    assert set(terms) == {"nsd.pixel", "nsd.logit", "nsd.box"}
    if part_balance:
        third = share / 3  # NSD's share, an equal part to each of its three enabled parts
        assert distiller.balance.shares == pytest.approx({f"nsd.{p}": third for p in ("pixel", "logit", "box")})
        for name, value in terms.items():
            assert float(value) == pytest.approx(third * 2.0, rel=1e-5), name
    else:
        assert distiller.balance.shares == {"nsd": share}
        assert float(sum(terms.values())) == pytest.approx(share * 2.0, rel=1e-5)
        for name in terms:
            assert float(terms[name] / terms["nsd.logit"]) == pytest.approx(
                float(raw[name] / raw["nsd.logit"]), rel=1e-5
            )


def test_a_term_left_out_of_its_components_balance_units_is_refused():
    info = make_info()
    hp = {"pixel": True, "box": True, "angle": False, "part_balance": True}
    distiller = build_distiller({"nsd": hp}, info, info, balance={"steps": 1})
    distiller.components["nsd"].balance_units = lambda: ("pixel", "logit")  # box: in no unit
    distiller.balance = build_balance(distiller.components, {"steps": 1})
    student = make_output(info, requires_grad=True)
    teacher = make_output(info, gen=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"KD term nsd.box is in no balanced unit"):
        distiller.train()(student, teacher, make_targets(), task_loss=torch.tensor(2.0))
