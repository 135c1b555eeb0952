"""Knowledge-distillation components, their registry and the distiller that combines them.

Importing this package registers every KD method in :data:`KD_METHODS`.
"""

from __future__ import annotations

from rkd.distill.base import KD_METHODS, KDComponent, Param, check_compatible, register, resolve_hparams
from rkd.distill.distiller import Distiller, build_distiller, detach_output, nonfinite_terms, validate_methods

# KD methods (each import registers its components).
from rkd.distill import fitnet  # noqa: E402,F401
from rkd.distill import hinton  # noqa: E402,F401
from rkd.distill import nsd  # noqa: E402,F401
from rkd.distill import cid  # noqa: E402,F401
from rkd.distill import at  # noqa: E402,F401
from rkd.distill import fgd  # noqa: E402,F401
from rkd.distill import frs  # noqa: E402,F401
from rkd.distill import pkd  # noqa: E402,F401
from rkd.distill import cwd  # noqa: E402,F401
from rkd.distill import ds2d2  # noqa: E402,F401
from rkd.distill import ifkd  # noqa: E402,F401

__all__ = [
    "KD_METHODS",
    "KDComponent",
    "Param",
    "check_compatible",
    "register",
    "resolve_hparams",
    "Distiller",
    "build_distiller",
    "detach_output",
    "nonfinite_terms",
    "validate_methods",
]
