"""Knowledge-distillation components, their registry and the distiller that combines them.

One component base (:class:`KDComponent`), one registry per task (:data:`KD_METHODS` for
detection, :data:`CLASSIFIER_KD_METHODS` for classification; :func:`register`) and one
:class:`Distiller` serve detectors and scene classifiers alike. The methods live in
:mod:`rkd.distill.detection` and :mod:`rkd.distill.classification`; shared building blocks
(losses in :mod:`~rkd.distill.functional`, adapters in :mod:`~rkd.distill.connectors`, model
checks in :mod:`~rkd.distill.checks`, the loss balance, masks, wavelets, priors) sit here.

Importing this package registers every KD method of both tasks.
"""

from __future__ import annotations

# The methods (each import registers its components).
from rkd.distill import (
    classification,  # noqa: F401
    detection,  # noqa: F401
)
from rkd.distill.base import (
    CLASSIFIER_KD_METHODS,
    KD_METHODS,
    KDComponent,
    Option,
    Param,
    check_compatible,
    check_declared_sign,
    methods_of,
    register,
    resolve_hparams,
)
from rkd.distill.distiller import Distiller, build_distiller, detach_output, nonfinite_terms, validate_methods

__all__ = [
    "CLASSIFIER_KD_METHODS",
    "KD_METHODS",
    "KDComponent",
    "Option",
    "Param",
    "check_compatible",
    "check_declared_sign",
    "methods_of",
    "register",
    "resolve_hparams",
    "Distiller",
    "build_distiller",
    "detach_output",
    "nonfinite_terms",
    "validate_methods",
]
