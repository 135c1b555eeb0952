"""Classification KD methods on :class:`~rkd.outputs.ClassifierOutput`; importing this package registers
them in :data:`rkd.distill.base.CLASSIFIER_KD_METHODS`."""

from __future__ import annotations

# In this order: the registry's order, for listings and the search's method order.
# isort: off
from rkd.distill.classification import hinton
from rkd.distill.classification import fitnet
from rkd.distill.classification import at
from rkd.distill.classification import dkd
from rkd.distill.classification import sskd
# isort: on

__all__ = ["at", "dkd", "fitnet", "hinton", "sskd"]
