"""Launching a training job on Ray Train (``TorchTrainer``, Train V2 API)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rkd.train.loop import STUDENT_FILE, train_loop
from rkd.train.spec import Resources

# A run whose controller cannot start (e.g. resources that never free up) fails
# after this many controller failures instead of retrying forever.
CONTROLLER_FAILURE_LIMIT = 1


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    checkpoint_dir: str | None

    @property
    def student_path(self) -> str | None:
        return os.path.join(self.checkpoint_dir, STUDENT_FILE) if self.checkpoint_dir else None


def ensure_ray(address: str | None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` or start an embedded local Ray (idempotent).

    Inside a Ray Job (``RAY_ADDRESS`` set by Ray) the job's cluster is used.
    """
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "ERROR"}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)


def build_trainer(
    loop_config: dict[str, Any],
    resources: Resources,
    storage_path: Path | str,
    name: str,
    callbacks: list[Any] | None = None,
    max_failures: int = 0,
) -> TorchTrainer:
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
        ),
    )


def run_training(
    loop_config: dict[str, Any],
    resources: Resources,
    storage_path: Path | str,
    name: str,
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """Run the training loop to the end and return its last metrics and checkpoint folder."""
    result = build_trainer(loop_config, resources, storage_path, name, callbacks).fit()
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return TrainOutcome(metrics=dict(result.metrics or {}), checkpoint_dir=checkpoint)
