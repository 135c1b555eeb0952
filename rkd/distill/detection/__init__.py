"""Detection KD methods on :class:`~rkd.outputs.DetectorOutput`; importing this package registers them
in :data:`rkd.distill.base.KD_METHODS`."""

from __future__ import annotations

# In this order: the registry's order, for listings and the search's method order.
# isort: off
from rkd.distill.detection import fitnet
from rkd.distill.detection import hinton
from rkd.distill.detection import nsd
from rkd.distill.detection import cid
from rkd.distill.detection import at
from rkd.distill.detection import fgd
from rkd.distill.detection import frs
from rkd.distill.detection import pkd
from rkd.distill.detection import cwd
from rkd.distill.detection import ds2d2
from rkd.distill.detection import ifkd
# isort: on

__all__ = ["at", "cid", "cwd", "ds2d2", "fgd", "fitnet", "frs", "hinton", "ifkd", "nsd", "pkd"]
