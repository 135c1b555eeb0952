"""Loss balance: each KD method starts at a set strength against the task loss, whatever its weights.

Published KD weights were tuned for other detectors, feature widths and loss normalisations
(NSD's for a 256-channel R101 FPN in mmrotate): on another pair a method can start 10^4 times
stronger than the detection loss and wreck the student, or 10^4 times weaker and do nothing.
Nor does a KD loss's *value* say how hard it pulls: a feature MSE or a soft-target BCE sits on
a floor the student cannot go below (the teacher's feature variance it cannot reproduce, the
teacher's entropy), so two terms of equal value can differ 30x in gradient (measured on UCAS-AOD:
FitNet's MSE started 28x the detection loss and fell 10% in 8 epochs). What moves the student
is the gradient, so ``mode: auto`` measures, over the first ``steps`` training steps, the norm of
each method's gradient on the student's parameters against the task loss's (or each of its terms', for
a component that names them in ``balance_units()``: one extra backward pass per unit),

    r_m = mean_{first steps} ||grad_theta L_m|| / ||grad_theta L_task||

(theta: the student's parameters, not the KD parts' own), multiplies the method's terms (at
their own relative weights) by ``s_m = ratio / r_m`` and freezes ``s_m`` for the rest of the
run: each method starts pulling on the student ``ratio`` times as hard as the task loss (times the
method's ``balance_share``, 1 unless its measurements say otherwise: SSKD's is 0.1). This is
the initial balancing of GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018, PMLR 80:794-803), fixed after a window
instead of adapted, so the run stays an ordinary fixed-weight training. While the window is open
``s_m`` uses the steps seen so far; each of those steps costs one extra backward pass per method.
The scales are buffers (saved with the KD parts, restored on resume) and reported as metrics.
With ``every: N > 0`` the ratio is measured again every N steps after the window and the estimate
moves halfway to each new measurement: for a term whose pull grows after the start (an adapter
initialised near zero, as NSD's, lets almost no gradient reach the student in the first steps).

``mode: off`` uses the weights as given (the published points) and measures the ratio of the
loss *values* instead (no extra backward), so a trial whose KD loss dominates the task loss by
orders of magnitude can say so. Without parameters to measure on (:meth:`LossBalance.watch` not
called, as in a component's unit tests) ``auto`` falls back to the loss values too.

Under DDP the ratios are averaged over the ranks, so every rank applies the same scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BALANCE_MODES = ("auto", "off")
BALANCE_DEFAULTS: dict[str, Any] = {"mode": "auto", "ratio": 1.0, "steps": 10, "every": 0}
ZERO = torch.zeros(())  # the loss of a unit that gave no term this step: nothing to measure
# A KD method that starts this many times larger than the task loss is named in a warning.
DOMINANT_RATIO = 100.0


def check_balance(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cfg`` with defaults filled in; ``ValueError`` naming the key for a bad entry.

    >>> check_balance({"ratio": 0.5})
    {'mode': 'auto', 'ratio': 0.5, 'steps': 10, 'every': 0}
    >>> check_balance({"mode": "of"})
    Traceback (most recent call last):
    ...
    ValueError: mode: expected one of ['auto', 'off'], got 'of'
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(BALANCE_DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; kd_balance has {sorted(BALANCE_DEFAULTS)}")
    out = {**BALANCE_DEFAULTS, **cfg}
    if out["mode"] not in BALANCE_MODES:
        raise ValueError(f"mode: expected one of {list(BALANCE_MODES)}, got {out['mode']!r}")
    ratio = out["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
        raise ValueError(f"ratio: expected a finite number > 0, got {ratio!r}")
    steps = out["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    every = out["every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"every: expected an integer >= 0, got {every!r}")
    out["ratio"] = float(ratio)
    return out


class LossBalance(nn.Module):
    """Per-method scales fitted over the first steps, then frozen or re-measured (see the module doc).
    ``methods`` are the balanced units: method names, or ``<method>.<term>`` (:func:`build_balance`)."""

    def __init__(
        self,
        methods: Sequence[str],
        mode: str = "auto",
        ratio: float = 1.0,
        steps: int = 10,
        every: int = 0,
        shares: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.methods = list(methods)
        # a method's target pull is ratio * share: its default strength relative to the others
        self.shares = {m: float((shares or {}).get(m, 1.0)) for m in self.methods}
        self.mode, self.ratio, self.steps, self.every = mode, float(ratio), int(steps), int(every)
        # float64: ratios can span 1e-6..1e6 between methods.
        self.register_buffer("ratio_sum", torch.zeros(len(self.methods), dtype=torch.float64))
        self.register_buffer("current", torch.zeros(len(self.methods), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))  # measurements in the first window
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # training steps observed
        self._params: list[Tensor] = []

    def watch(self, params: Sequence[Tensor]) -> None:
        """The student's parameters the gradients are measured on (``mode: auto``)."""
        self._params = [p for p in params if p.requires_grad]

    @property
    def calibrating(self) -> bool:
        """Whether the first window is still open."""
        return int(self.seen) < self.steps

    @property
    def measuring(self) -> bool:
        """Whether the next training step is measured: in the first window, then every ``every`` steps."""
        return self.calibrating or (self.every > 0 and int(self.step) % self.every == 0)

    @property
    def by_gradient(self) -> bool:
        return self.mode == "auto" and bool(self._params)

    def start_ratios(self) -> dict[str, float]:
        """Each method's measured ratio to the task loss over the first window (so far)."""
        n = max(1, int(self.seen))
        return {m: float(self.ratio_sum[i]) / n for i, m in enumerate(self.methods)}

    def scales(self) -> dict[str, float]:
        """The multiplier of each method's terms (1 with ``mode: off``, before any step, and for a
        method that had no measurable effect on the student)."""
        if self.mode == "off" or int(self.seen) == 0:
            return {m: 1.0 for m in self.methods}
        return {
            m: self.ratio * self.shares[m] / float(r) if r > 1e-12 else 1.0 for m, r in zip(self.methods, self.current)
        }

    def observe(self, method_losses: Mapping[str, Tensor], task_loss: Tensor) -> None:
        """Count one training step, measuring it when :attr:`measuring`. ``task_loss`` and the
        method losses must still hold their graphs when the ratios are gradient norms.

        In the first window the estimate is the mean of the window's ratios; each later
        measurement (``every > 0``) moves it halfway to the new ratio."""
        if self.measuring:
            ratios = self._ratios(method_losses, task_loss)
            if self.calibrating:
                self.ratio_sum += ratios
                self.seen += 1
                self.current.copy_(self.ratio_sum / self.seen)
            else:
                self.current.mul_(0.5).add_(0.5 * ratios)
        self.step += 1

    def _ratios(self, method_losses: Mapping[str, Tensor], task_loss: Tensor) -> Tensor:
        if self.by_gradient:
            task = self._grad_norm(task_loss)
            sizes = [self._grad_norm(method_losses.get(m, ZERO)) for m in self.methods]
        else:
            task = task_loss.detach().double().reshape(()).cpu()
            sizes = [method_losses.get(m, ZERO).detach().double().reshape(()).cpu() for m in self.methods]
        ratios = torch.stack(sizes) / task.clamp_min(1e-12)
        ratios = torch.nan_to_num(ratios, nan=0.0, posinf=0.0)  # a non-finite step is skipped by the loop
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ratios = ratios.to(collective_device())
            torch.distributed.all_reduce(ratios)
            ratios = ratios / torch.distributed.get_world_size()
        return ratios.to(self.ratio_sum.device)

    def _grad_norm(self, loss: Tensor) -> Tensor:
        """``||d loss / d theta||`` over the watched parameters (0 when the loss does not reach them)."""
        if not loss.requires_grad:
            return torch.zeros((), dtype=torch.float64)
        grads = torch.autograd.grad(loss, self._params, retain_graph=True, allow_unused=True)
        squares = [g.detach().double().pow(2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt().cpu() if squares else torch.zeros((), dtype=torch.float64)

    def warnings(self) -> list[str]:
        """With ``mode: off``, the methods whose loss started orders of magnitude above the task loss."""
        if self.mode != "off" or int(self.seen) == 0:
            return []
        return [
            f"{m}: its KD loss started {r:.3g}x the task loss (weights as given, kd_balance off)"
            for m, r in self.start_ratios().items()
            if r > DOMINANT_RATIO
        ]

    def extra_repr(self) -> str:
        return f"methods={self.methods}, mode={self.mode!r}, ratio={self.ratio:g}, steps={self.steps}"


def build_balance(components: Mapping[str, Any], balance: Mapping[str, Any] | None) -> LossBalance | None:
    """The loss balance of a distiller's ``components`` (their ``balance_share`` each) under the
    ``kd_balance`` settings; None (weights as given, nothing measured) when ``balance`` is None.

    A balanced unit is a method, or ``<method>.<term>`` for each term a component names in its
    ``balance_units()``, each with an equal part of the method's share: a method whose published
    weights were tuned for another feature scale then cannot let one term crowd out the others."""
    if balance is None:
        return None
    shares: dict[str, float] = {}
    for name, component in components.items():
        units = component.balance_units()
        for unit in units or ("",):
            shares[f"{name}.{unit}" if unit else name] = component.balance_share / max(1, len(units))
    return LossBalance(list(shares), **check_balance(balance), shares=shares)


def balanced_terms(
    balance: LossBalance | None,
    per_method: Mapping[str, Mapping[str, Tensor]],
    task_loss: Tensor | None,
    training: bool,
    ramps: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Tensor]:
    """``"<method>.<term>"`` -> term, each method's terms scaled by ``balance`` (as given when None),
    then by its warm-up factor in ``ramps`` (``{method: {term: factor}}``, 1 where absent).

    A training step with ``task_loss`` (with its graph: gradients are measured) first adds its
    ratios to the balance's window while that is open. The window measures the terms before
    their ramps: a term measured while its warm-up holds it near 0 would get a scale that makes
    it pull 1/ramp times harder than ``ratio`` once the warm-up ends (measured on UCAS-AOD: NSD's
    logit term, ramped over 3 epochs, was balanced on ~0.1 of its strength and drove the
    student's classification loss from 1.2 to 5.2 in its second epoch).
    """
    units = set(balance.methods) if balance is not None else set()

    def unit(method: str, term: str) -> str:  # what scales a term: its own unit, else its method's
        name = f"{method}.{term}" if f"{method}.{term}" in units else method
        if balance is not None and name not in units:  # a term its component's balance_units() left out
            raise ValueError(f"KD term {method}.{term} is in no balanced unit of {sorted(units)}")
        return name

    scales: dict[str, float] = {}
    if balance is not None:
        if training and task_loss is not None:
            grouped: dict[str, list[Tensor]] = {}
            for m, terms in per_method.items():
                for term, v in terms.items():
                    grouped.setdefault(unit(m, term), []).append(v)
            balance.observe({u: _sum(vs) for u, vs in grouped.items()}, task_loss)
        scales = balance.scales()
    ramps = ramps or {}
    return {
        f"{m}.{term}": v * (scales.get(unit(m, term), 1.0) * ramps.get(m, {}).get(term, 1.0))
        for m, terms in per_method.items()
        for term, v in terms.items()
    }


def _sum(terms: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else torch.zeros(())


def collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = [
    "BALANCE_DEFAULTS",
    "BALANCE_MODES",
    "DOMINANT_RATIO",
    "LossBalance",
    "balanced_terms",
    "check_balance",
    "collective_device",
]
