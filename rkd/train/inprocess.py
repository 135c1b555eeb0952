"""Single-worker CPU training in the caller's own process, with Ray Train's checkpoints.

A ``TorchTrainer`` with one worker starts a Train controller and a worker actor (two more
processes, each importing torch and Ray Train): 9-10 s of a trial's start-up on a 2-core machine
(docs/benchmarks.md). A single CPU worker needs neither, so :class:`InProcessTrainer` runs the loop
in the calling thread. Ray Train's own local mode (``ScalingConfig(num_workers=0)``) keeps no
checkpoint and refuses ``ray.train.report`` inside a Tune trial, so this trainer keeps its
checkpoints with Ray Train's own checkpoint manager and storage layout instead: the same
``checkpoint_*`` folders, snapshot and keep policy, so a run resumes from either kind of trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ray.train import Checkpoint, CheckpointConfig, Result
from torch import nn

# Ray Train's checkpoint manager and storage are internal (as of Ray 2.60, the version
# constraints.txt pins): where another Ray lacks them, every run goes through TorchTrainer.
try:
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport
except ImportError:  # pragma: no cover - only with a Ray whose internals moved
    AVAILABLE = False
    CheckpointManager = object  # type: ignore[assignment,misc]
else:
    AVAILABLE = True

from rkd.train.session import active


class _Checkpoints(CheckpointManager):
    """Ray Train's checkpoint manager, used from one thread without the controller's event loop."""

    def _notify(self) -> None:
        pass  # only the controller's asyncio waiters listen, and there is no controller here


class InProcessSession:
    """The loop's run when it is the only worker: rank 0 of 1 on the CPU, in this process."""

    world_rank, world_size = 0, 1

    def __init__(
        self, run_name: str, checkpoints: CheckpointManager, storage: StorageContext, callbacks: list[Any]
    ) -> None:
        self.run_name = run_name
        self.checkpoints, self.storage, self.callbacks = checkpoints, storage, callbacks
        self.last_metrics: dict[str, Any] | None = None

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device())  # one process: no DDP wrapper, as Ray Train does for one worker

    def get_checkpoint(self) -> Checkpoint | None:
        latest = self.checkpoints.latest_checkpoint_result
        return latest.checkpoint if latest is not None else None

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None = None) -> None:
        """As Ray Train's controller does with rank 0's report: persist the checkpoint to the run's
        storage, register it (the keep policy deletes what it no longer keeps), tell the callbacks."""
        persisted = None
        if checkpoint is not None:
            folder = self.storage.make_default_checkpoint_dir_name()
            persisted = self.storage.persist_current_checkpoint(checkpoint, folder)
            report = _TrainingReport(checkpoint=persisted, metrics=metrics, validation=False)
            self.checkpoints.register_checkpoint(report)
        self.last_metrics = metrics
        for callback in self.callbacks:
            callback.after_report(run_context=None, metrics=[metrics], checkpoint=persisted)


class InProcessTrainer:
    """``loop(config)`` run in this thread, with the ``fit()`` of a one-worker ``TorchTrainer``."""

    def __init__(
        self,
        loop: Callable[[dict[str, Any]], None],
        config: dict[str, Any],
        storage_path: str,
        name: str,
        checkpoint_config: CheckpointConfig,
        callbacks: list[Any],
    ) -> None:
        self.loop, self.config, self.storage_path, self.name = loop, config, storage_path, name
        self.checkpoint_config, self.callbacks = checkpoint_config, callbacks

    def fit(self) -> Result:
        storage = StorageContext(self.storage_path, self.name)
        checkpoints = _Checkpoints(self.checkpoint_config, storage)  # loads the run's snapshot: a rerun resumes
        session = InProcessSession(self.name, checkpoints, storage, self.callbacks)
        with active(session):
            self.loop(self.config)
        return Result(
            metrics=session.last_metrics or {},
            checkpoint=session.get_checkpoint(),
            path=storage.experiment_fs_path,
            error=None,
            _storage_filesystem=storage.storage_filesystem,
        )
