"""Prior stages of KD components, trained once on the frozen teacher and cached.

Some components need modules trained before distillation starts: DS2D2's high-frequency
amplifier is a head trained to reproduce the teacher's outputs from the teacher's high
wavelet bands, then frozen. :func:`prepare_priors` trains each such component's
``prior_stage_modules()`` for a few epochs (Adam, in the calling process: it is small) on
the teacher's outputs over the train split, and saves their ``state_dict`` atomically as
``<cache_dir>/<method>-<key>.pt``. The key is a content hash of what the result depends on:
the teacher checkpoint's bytes, the data's fingerprint, the component's ``prior_stage_config()``
(the hyperparameters that shape the prior modules, the prior epochs and learning rate),
the seed and the stage's batch size. Every later ``rkd train`` and search trial with the same
settings reuses the file; a file that does not load (torn, foreign, another key) is trained again.

The distillation loop loads the saved state with :func:`attach_prior_states`, which also
freezes the modules (no gradients, so no optimiser updates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from rkd import storage
from rkd.atomic import atomic_copy
from rkd.data.cache import file_digest
from rkd.data.dataset import build_dataset, collate_detection
from rkd.data.fingerprint import dataset_fingerprint
from rkd.distill.base import KD_METHODS, KDComponent
from rkd.distill.distiller import Distiller, build_distiller, validate_methods
from rkd.errors import RkdError
from rkd.train.checkpoint import atomic_torch_save, load_detector
from rkd.train.config import config_hash

PRIOR_FORMAT = 1
# Fixed (not the student's batch size) so trials that change the student share one prior.
PRIOR_BATCH_SIZE = 8


@dataclass
class PriorResult:
    method: str
    path: str
    trained: bool  # False: reused from the cache
    losses: list[float] = field(default_factory=list)  # mean prior-stage loss per epoch (when trained)


def prior_key(method: str, component: KDComponent, teacher_digest: str, data_fingerprint: str, seed: int) -> str:
    """The cache key of one component's prior stage."""
    return config_hash(
        "prior",
        PRIOR_FORMAT,
        method,
        teacher_digest,
        data_fingerprint,
        component.prior_stage_config(),
        seed,
        PRIOR_BATCH_SIZE,
    )


def read_prior_state(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The cached ``state_dict`` in ``path``; raises :class:`RkdError` if it is not a valid prior file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn, truncated or foreign
        raise RkdError(f"{path}: not a readable prior-stage file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("kind") != "kd_prior" or not isinstance(blob.get("state_dict"), dict):
        raise RkdError(f"{path}: not a prior-stage file (missing 'kind: kd_prior' / 'state_dict')")
    if key is not None and blob.get("key") != key:
        raise RkdError(f"{path}: holds the prior of other settings (key {blob.get('key')!r}, expected {key!r})")
    return blob["state_dict"]


def train_prior_stage(
    component: KDComponent, teacher: nn.Module, loader: DataLoader, epochs: int, lr: float
) -> list[float]:
    """Train ``component.prior_stage_modules()`` on the frozen teacher; mean loss per epoch."""
    modules = component.prior_stage_modules()
    if modules is None:
        raise RkdError(f"KD method {component.name!r} declares a prior stage but has no prior-stage modules")
    device = next(teacher.parameters()).device
    modules.to(device).train().requires_grad_(True)
    optimizer = torch.optim.Adam(modules.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        total, seen = 0.0, 0
        for images, targets, _ in loader:
            images, targets = images.to(device), targets.to(device)
            with torch.no_grad():
                teacher_out = teacher(images)
            loss = component.prior_stage_loss(teacher_out, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * images.shape[0]
            seen += images.shape[0]
        losses.append(total / max(1, seen))
    return losses


PRIOR_CACHE_ENV = "RKD_PRIOR_CACHE"


def prior_cache_dir() -> Path:
    """rkd's machine-wide folder of trained prior stages: ``$RKD_PRIOR_CACHE``, else ``priors`` in
    rkd's cache folder. Files are named by the content key, so any run of any name can reuse them."""
    return Path(os.environ.get(PRIOR_CACHE_ENV) or storage.cache_root() / "priors")


def prepare_priors(
    methods: Mapping[str, Any] | None,
    teacher_checkpoint: str | Path,
    data_spec: dict[str, Any],
    cache_dir: str | Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
    remote: str | None = None,
    kept_dir: Path | None = None,
) -> dict[str, PriorResult]:
    """Train (or reuse from ``cache_dir``) the prior stage of every method in ``methods`` that has one.

    Returns ``{method: PriorResult}`` (empty when no method needs a prior stage); pass
    ``{m: r.path}`` to the loop config as ``prior_states``. ``teacher_checkpoint`` may be a
    storage URI. With ``remote`` (a storage URI shared by all nodes) the cache lives there:
    a state found there is reused, a trained one is uploaded, and the paths returned are URIs.
    With ``kept_dir`` (:func:`prior_cache_dir`), a state trained by any earlier run is copied from
    there into ``cache_dir`` instead of being trained again, and a newly trained one is kept there.
    """
    if not methods or not any(getattr(KD_METHODS.get(m), "has_prior_stage", False) for m in methods):
        return {}  # no method can have a prior stage: do not even load the teacher
    teacher_path = storage.local_copy(teacher_checkpoint)
    teacher, _ = load_detector(teacher_path)
    teacher.to("cuda" if torch.cuda.is_available() else "cpu").eval().requires_grad_(False)
    teacher_digest = file_digest(teacher_path)
    fingerprint = dataset_fingerprint(data_spec)
    cache_dir = Path(cache_dir)
    results: dict[str, PriorResult] = {}
    train_set = None
    for name, hparams in validate_methods(methods).items():
        if not KD_METHODS[name].has_prior_stage:
            continue
        # Built alone, from the seed: the same settings give the same initial modules whatever
        # other methods are on. The prior modules depend on the teacher alone; the teacher's
        # info stands in for the student's, so the file is shared by every student of a search.
        torch.manual_seed(seed)
        component = build_distiller({name: hparams}, teacher.info, teacher.info).components[name]
        if not component.has_prior_stage:  # e.g. ds2d2 with hf_amplifier: false
            continue
        key = prior_key(name, component, teacher_digest, fingerprint, seed)
        path = cache_dir / f"{name}-{key}.pt"
        shared = storage.join(remote, path.name) if remote else None
        modules = component.prior_stage_modules()
        assert modules is not None
        if shared and not path.is_file():
            # trained by another trial, maybe on another node
            path = storage.local_copy(shared, missing_ok=True) or path
        kept = kept_dir / path.name if kept_dir is not None else None
        if kept is not None and not path.is_file() and kept.is_file():
            atomic_copy(kept, path)  # trained by an earlier run, whatever its name
            log(f"[prior] {name}: copied from rkd's cache {kept} (trained by an earlier run)")
        if path.is_file():
            try:
                modules.load_state_dict(read_prior_state(path, key))
                log(f"[prior] {name}: reusing {path} (same teacher, data and settings)")
                results[name] = PriorResult(name, shared or str(path), trained=False)
                continue
            except (RkdError, RuntimeError) as exc:  # RuntimeError: the state does not fit the modules
                log(f"[prior] {name}: {path} is unusable ({str(exc).splitlines()[0]}); training it again")
        if train_set is None:
            train_set = build_dataset(data_spec, "train", train=False)
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(train_set, generator=generator)
        loader = DataLoader(train_set, batch_size=PRIOR_BATCH_SIZE, sampler=sampler, collate_fn=collate_detection)
        start = time.perf_counter()
        epochs, lr = int(component.options["prior_epochs"]), float(component.options["prior_lr"])
        losses = train_prior_stage(component, teacher, loader, epochs, lr)
        modules.cpu()
        state = {k: v.detach().cpu() for k, v in modules.state_dict().items()}
        atomic_torch_save(
            {
                "format": PRIOR_FORMAT,
                "kind": "kd_prior",
                "method": name,
                "key": key,
                "config": component.prior_stage_config(),
                "losses": losses,
                "state_dict": state,
            },
            path,
        )
        log(
            f"[prior] {name}: trained its prior stage for {epochs} epochs (loss {losses[0]:.4g} -> {losses[-1]:.4g}, "
            f"{time.perf_counter() - start:.0f}s) -> {path}"
        )
        if shared:
            storage.push(path, shared)
        if kept is not None:
            atomic_copy(path, kept)
        results[name] = PriorResult(name, shared or str(path), trained=True, losses=losses)
    return results


def attach_prior_states(distiller: Distiller, prior_states: Mapping[str, str] | None) -> None:
    """Load each component's cached prior modules and freeze them.

    Raises :class:`RkdError` when a component that needs a prior stage has no state: its
    untrained modules would distil noise.
    """
    prior_states = dict(prior_states or {})
    needed = distiller.prior_stage_components()
    missing = sorted(set(needed) - set(prior_states))
    if missing:
        raise RkdError(
            f"KD method(s) {missing} need their prior stage, and the loop config has no prior_states for them "
            "(rkd.train.prior.prepare_priors computes them; `rkd train` and `rkd search` do it)"
        )
    for name, component in needed.items():
        modules = component.prior_stage_modules()
        assert modules is not None
        modules.load_state_dict(read_prior_state(storage.local_copy(prior_states[name])))
        # Frozen: no gradient, so the optimiser (which takes requires_grad parameters only) skips them.
        modules.requires_grad_(False)


__all__ = [
    "PRIOR_BATCH_SIZE",
    "PriorResult",
    "attach_prior_states",
    "prepare_priors",
    "prior_key",
    "read_prior_state",
    "train_prior_stage",
]
