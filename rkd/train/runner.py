"""Launching a training job on Ray Train (``TorchTrainer``, Train V2 API), or in-process for one CPU worker."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from rkd import storage
from rkd.metrics import metric_label
from rkd.train import inprocess
from rkd.train.checkpoint import SCORE_METRIC, UNSCORED
from rkd.train.config import TrainConfig
from rkd.train.inprocess import InProcessTrainer
from rkd.train.loop import train_loop
from rkd.train.spec import Resources

# A run whose controller cannot start (e.g. resources that never free up) fails
# after this many controller failures instead of retrying forever.
CONTROLLER_FAILURE_LIMIT = 1


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    checkpoint_dir: str | None


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
        _start_embedded(num_cpus or os.cpu_count() or 1, kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_embedded(num_cpus: int, kwargs: dict[str, Any]) -> None:
    """Start a local Ray whose own processes know its address.

    Ray's placement-group cleaner (which frees the resources of a trial Tune
    stopped early) finds its cluster by auto-discovery, which fails when another
    Ray runs on the machine, and the stopped trial's CPUs then stay taken. The
    raylet and every worker it starts inherit the environment of this call, so
    ``RAY_ADDRESS`` names this cluster for them; the driver's environment is
    restored afterwards so a later run in this process starts afresh.
    """
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def single_cpu_worker(resources: Resources) -> bool:
    """Whether a training of ``resources`` can run in the process that starts it: one worker, no GPU.

    Such a run has no DDP to set up, so it needs no Ray Train worker group (see
    :mod:`rkd.train.inprocess`); several workers or a GPU always go through ``TorchTrainer``, and
    so does everything on a Ray whose Train internals the in-process trainer cannot use.
    """
    return resources.workers == 1 and resources.gpus_per_worker == 0 and inprocess.AVAILABLE


def launcher_resources(resources: Resources) -> dict[str, float]:
    """What a Tune trial that launches a training of ``resources`` holds.

    A single CPU worker runs in the trial's own process, which then holds the worker's CPUs;
    otherwise the trial only launches Train workers and holds no CPU, so the workers get all of
    them (Tune needs a non-empty bundle, hence a little memory instead).
    """
    if single_cpu_worker(resources):
        return {"cpu": resources.cpus_per_worker}
    return {"cpu": 0, "memory": 64 * 2**20}


def reuse_trial_processes(resources: Resources) -> bool:
    """Whether Tune should run trial after trial in the same process (``reuse_actors``).

    Only where the trials train in their own process: the next one then skips a process start
    and finds the data's records and the teacher already read (once per process, see
    :func:`rkd.train.checkpoint.read_checkpoint_kept`). A trial that launches Train workers keeps
    nothing worth reusing.
    """
    return single_cpu_worker(resources)


def build_trainer(
    loop_config: dict[str, Any],
    resources: Resources,
    storage_path: Path | str,
    name: str,
    callbacks: list[Any] | None = None,
    max_failures: int = 0,
    loop: Callable[[dict[str, Any]], None] = train_loop,
    local_dir: Path | None = None,
    in_process: bool = False,
) -> TorchTrainer | InProcessTrainer:
    """A ``TorchTrainer`` running ``loop`` (:func:`rkd.train.loop.train_loop`, every task's loop, by default).

    ``storage_path``: a folder or a storage URI (checkpoints go there); ``local_dir``: where
    this node's own logs go (default ``storage_path``, which must then be a folder).
    ``in_process``: run the loop in the calling process instead (:class:`InProcessTrainer`, same
    checkpoints and callbacks), for the caller that holds the worker's CPUs itself; only for
    :func:`single_cpu_worker` resources and no retries, which are Ray Train's.
    """
    local = _local_dir(storage_path, local_dir)
    settings = TrainConfig.from_dict(loop_config["train"])
    checkpoints = checkpoint_config(settings.keep)
    loggers = logger_callbacks(settings.logging, local / name)
    if in_process:
        if not single_cpu_worker(resources) or max_failures:
            raise ValueError(f"in-process training needs one CPU worker and no retries, got {resources}")
        return InProcessTrainer(loop, loop_config, str(storage_path), name, checkpoints, [*(callbacks or []), *loggers])
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=checkpoints,
            callbacks=[*(callbacks or []), *loggers],
        ),
    )


def _local_dir(storage_path: Path | str, local_dir: Path | None) -> Path:
    if local_dir is not None:
        return Path(local_dir)
    if storage.is_uri(storage_path):
        raise ValueError(f"storage {storage_path} is a URI: give local_dir for this node's logs")
    return Path(storage_path)


def checkpoint_config(keep: int) -> CheckpointConfig:
    """Which checkpoints Ray keeps: the last two (default), or with ``keep: k`` the k best by val mAP50.

    Either way the run resumes from the LATEST checkpoint: Train V2 hands ``get_checkpoint()``
    its latest registered one whatever the score, and never deletes it. Epochs without an
    evaluation report a score of -1, below every real mAP, so they are dropped first.
    """
    if int(keep) <= 0:
        return CheckpointConfig(num_to_keep=2)  # the last two: resume survives a torn latest
    return CheckpointConfig(
        num_to_keep=int(keep), checkpoint_score_attribute=SCORE_METRIC, checkpoint_score_order="max"
    )


def logger_callbacks(logging: dict[str, bool] | None, run_dir: Path) -> list[UserCallback]:
    """Ray Train callbacks for the loggers named in ``logging`` (validated in the spec)."""
    chosen = logging or {}
    callbacks: list[UserCallback] = []
    if chosen.get("tensorboard"):
        callbacks.append(TensorBoardCallback(str(run_dir / "tensorboard")))
    if chosen.get("mlflow"):
        callbacks.append(MLflowCallback(str(run_dir.name)))
    return callbacks


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among rank 0's metrics (what a scalar logger can plot)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class TensorBoardCallback(UserCallback):
    """Writes each epoch's metrics as TensorBoard scalars (step = epoch), from the Train controller."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self._writer is None:  # made here, in the controller: a writer does not pickle
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        row = metrics[0] if metrics else {}
        step = int(row.get("epoch", 0))
        for key, value in numeric_metrics(row).items():
            self._writer.add_scalar(key.replace(".", "/"), value, step)
        self._writer.flush()


class MLflowCallback(UserCallback):
    """Logs each epoch's metrics to MLflow (one MLflow run per training run).

    The tracking URI is the ``MLFLOW_TRACKING_URI`` of the process that builds the trainer:
    the callback runs in Ray Train's controller, whose environment is Ray's, not the caller's.
    """

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self._run_id: str | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        if self._run_id is None:
            self._run_id = mlflow.start_run(run_name=self.run_name).info.run_id
            mlflow.end_run()
        row = metrics[0] if metrics else {}
        with mlflow.start_run(run_id=self._run_id):
            mlflow.log_metrics(numeric_metrics(row), step=int(row.get("epoch", 0)))


class ProgressTail:
    """Calls ``on_row`` for each JSON line appended to ``path`` while a run trains (a thread)."""

    def __init__(self, path: Path, on_row: Callable[[dict[str, Any]], None], interval_s: float = 1.0) -> None:
        self.path, self.on_row, self.interval_s = path, on_row, interval_s
        self._offset = path.stat().st_size if path.exists() else 0  # only this run's lines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as fh:
            fh.seek(self._offset)
            while True:
                line = fh.readline()
                if not line.endswith("\n"):  # a line still being written: read it next time
                    break
                self._offset += len(line.encode("utf-8"))
                try:
                    self.on_row(json.loads(line))
                except json.JSONDecodeError:
                    pass


def run_training(
    loop_config: dict[str, Any],
    resources: Resources,
    storage_path: Path | str,
    name: str,
    callbacks: list[Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    loop: Callable[[dict[str, Any]], None] = train_loop,
    local_dir: Path | None = None,
) -> TrainOutcome:
    """Run the training loop to the end and return its last metrics and checkpoint folder.

    ``on_epoch(metrics)`` is called in the driver after each epoch (from the run's progress
    file, written by rank 0 under ``local_dir``: seen when rank 0 runs on this node or the
    folder is shared). With a storage URI the final checkpoint is downloaded under ``local_dir``.
    """
    local = _local_dir(storage_path, local_dir)
    progress = local / name / "progress.jsonl" if on_epoch is not None else None
    config = {**loop_config, "progress_file": str(progress) if progress else None}
    # In this (the driver's) process only on the embedded local Ray: a cluster's driver may be a
    # small machine, and there the worker belongs on a node Ray chooses.
    in_process = single_cpu_worker(resources) and not (resources.ray_address or os.environ.get("RAY_ADDRESS"))
    trainer = build_trainer(
        config, resources, storage_path, name, callbacks, loop=loop, local_dir=local, in_process=in_process
    )
    if progress is None:
        result = trainer.fit()
    else:
        with ProgressTail(progress, on_epoch):
            result = trainer.fit()
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = result.checkpoint.path
        if storage.is_uri(storage_path):
            target = local / name / "final_checkpoint"
            if target.exists():
                shutil.rmtree(target)
            checkpoint = result.checkpoint.to_directory(str(target))
    return TrainOutcome(metrics=dict(result.metrics or {}), checkpoint_dir=checkpoint)


def epoch_score(m: dict[str, Any], key: str | None = None) -> str:
    """An epoch's score as its progress lines show it: ``val top-1 0.897``, or ``not evaluated``.

    Epochs between evaluations (``eval_every``; by default all but the last) report a score of 0
    that is no score at all: printed as a number it reads as a collapsed model.

    >>> epoch_score({"top1": 0.0, SCORE_METRIC: UNSCORED}), epoch_score({"map50": 0.4567, SCORE_METRIC: 0.4567})
    ('not evaluated', 'val mAP50 0.457')
    """
    key = key or ("top1" if "top1" in m else "map50")
    if m.get(SCORE_METRIC) == UNSCORED:
        return "not evaluated"
    return f"val {metric_label(key)} {m.get(key, float('nan')):.3f}"


def epoch_line(label: str) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` that prints one line per epoch under ``label``."""

    def show(m: dict[str, Any]) -> None:
        print(
            f"[{label}] epoch {m.get('epoch')}/{m.get('epochs')} loss {m.get('loss', float('nan')):.4f} "
            f"{epoch_score(m)} ({m.get('images_per_s', 0.0):.1f} img/s, {m.get('epoch_s', 0.0):.0f}s/epoch)",
            flush=True,
        )
        if m.get("resume_warning"):
            print(f"[{label}] warning: {m['resume_warning']}", flush=True)

    return show
