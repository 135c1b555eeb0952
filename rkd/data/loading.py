"""The training loader's processes: how many, their options, and their augmentation seeds.

With ``workers: 0`` batches are loaded in the training process exactly as before (augmentations
draw from the process's torch RNG, seeded by the run's seed and rank). With ``workers >= 1``
the DataLoader's worker processes load batches ahead of the training step (persistent across
epochs, ``prefetch_factor`` batches each, into pinned memory on CUDA), and each sample's
augmentations draw from a torch RNG seeded by ``(seed, epoch, index)``: the same stream
whatever the number of workers and whichever worker loads the sample, and a resumed run draws
what the uninterrupted run would have. (It is not the stream of ``workers: 0``: that one follows
the order samples were loaded in one process, which worker processes cannot reproduce.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

MAX_DEFAULT_WORKERS = 4
PREFETCH_FACTOR = 2


def default_workers(cpus: int, cuda: bool) -> int:
    """Loader workers for a training process with ``cpus`` CPUs. On CUDA: all CPUs but the one that
    drives the GPU, at most 4 (more buys nothing once batches come faster than steps). On CPU: none,
    since the training step uses every CPU given to it; with the patch cache, loading is a small part
    of a CPU step and a worker only competes with it (docs/benchmarks.md, loader throughput).

    >>> [default_workers(c, cuda=True) for c in (1, 2, 3, 16)], default_workers(16, cuda=False)
    ([0, 1, 2, 4], 0)
    """
    return max(0, min(MAX_DEFAULT_WORKERS, int(cpus) - 1)) if cuda else 0


def resolve_workers(data_spec: dict[str, Any], cpus: int, device: torch.device) -> int:
    """``data.workers`` of a validated spec, its default (null or absent) from ``cpus`` and ``device``."""
    workers = data_spec.get("workers")
    return default_workers(cpus, device.type == "cuda") if workers is None else int(workers)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of one sample's augmentations (a mix of the three, not their sum: no two
    (epoch, index) pairs of a run share a stream).

    >>> sample_seed(0, 0, 1) != sample_seed(0, 1, 0)
    True
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class EpochIndices(Sampler):
    """``(epoch, index)`` for each index of ``sampler``; the loop sets ``epoch`` before each epoch."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        assert isinstance(self.sampler, Sized)
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` for an ``(epoch, index)`` key, with torch's RNG seeded by :func:`sample_seed`
    first. Used in loader worker processes only: it reseeds the global RNG of the process it runs in."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader keywords for ``workers`` loader processes feeding ``device``.

    >>> loader_options(0, torch.device("cpu"))
    {'num_workers': 0, 'pin_memory': False}
    >>> sorted(loader_options(2, torch.device("cuda")).items())
    [('num_workers', 2), ('persistent_workers', True), ('pin_memory', True), ('prefetch_factor', 2)]
    """
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return options
