"""Angle classification with circular smooth labels (CSL).

The le90 angle range ``[-pi/2, pi/2)`` is cut into ``bins`` equal bins; bin
``i`` is centred at ``-pi/2 + (i + 0.5) pi / bins``. The target of an angle is
a Gaussian over the bins, measured circularly (the last bin neighbours the
first, as ``-pi/2`` and ``pi/2`` are the same orientation), with a standard
deviation of 6 degrees (at least half a bin), so near-misses cost less than
far ones and there is no boundary jump.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def csl_sigma(bins: int) -> float:
    """Gaussian width in bins: 6 degrees, at least half a bin."""
    return max(bins * (6.0 / 180.0), 0.5)


def csl_targets(angles: Tensor, bins: int) -> Tensor:
    """``(N,)`` angles (any range; taken mod pi) -> ``(N, bins)`` smooth labels with peak 1 at the angle.

    >>> t = csl_targets(torch.tensor([-math.pi / 2 + math.pi / 8]), bins=4)  # the centre of bin 0
    >>> t.argmax(dim=1).tolist(), round(t[0, 0].item(), 3), torch.allclose(t[0, 1], t[0, 3])
    ([0], 1.0, True)
    """
    pos = torch.remainder(angles + math.pi / 2, math.pi) / (math.pi / bins) - 0.5  # in bin units
    centres = torch.arange(bins, device=angles.device, dtype=angles.dtype)
    d = torch.remainder(centres[None, :] - pos[:, None], bins)
    d = torch.minimum(d, bins - d)
    return torch.exp(-(d**2) / (2 * csl_sigma(bins) ** 2))


def angle_from_bins(logits: Tensor) -> Tensor:
    """``(..., bins)`` logits -> ``(...)`` centre angle of the best bin, in ``[-pi/2, pi/2)``.

    >>> angle_from_bins(torch.tensor([[0.0, 5.0, 0.0, 0.0]], dtype=torch.float64)).item() / math.pi  # bin 1 of 4
    -0.125
    """
    bins = logits.shape[-1]
    return -math.pi / 2 + (logits.argmax(dim=-1).to(logits.dtype) + 0.5) * (math.pi / bins)
