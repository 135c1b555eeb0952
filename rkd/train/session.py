"""What the training loop asks of the run it belongs to: its rank, device, resume checkpoint, reports.

Two kinds of run answer: Ray Train's worker group (:class:`RayTrainSession`, any number of
workers and nodes, DDP) and one CPU process running the loop itself
(:class:`rkd.train.inprocess.InProcessSession`), which :func:`active` makes current in that
thread. The loop calls :func:`current` and never needs to know which one it runs under.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn


class Session(Protocol):
    world_rank: int
    world_size: int
    run_name: str

    def device(self) -> torch.device: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def get_checkpoint(self) -> ray.train.Checkpoint | None: ...

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None = None) -> None: ...


class RayTrainSession:
    """The loop as one worker of a Ray Train ``TorchTrainer`` (DDP when there are several)."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name = ctx.get_experiment_name()

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def get_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None = None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


_local = threading.local()  # per thread: Tune runs each trial function in a thread of its own


@contextmanager
def active(session: Session) -> Iterator[Session]:
    """Make ``session`` the one :func:`current` returns in this thread while the block runs."""
    saved = getattr(_local, "session", None)
    _local.session = session
    try:
        yield session
    finally:
        _local.session = saved


def current() -> Session:
    """The session of the loop running in this thread: an in-process one, else Ray Train's."""
    return getattr(_local, "session", None) or RayTrainSession()
