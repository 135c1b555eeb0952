"""Model and shape checks shared by the KD methods.

Each raises ``ValueError`` naming the method (``KD method 'fitnet' ...``) when a student and a
teacher cannot be compared the way the method compares them; :func:`rkd.distill.base.check_compatible`
and the distiller turn it into a :class:`~rkd.errors.SpecError` under the method's name before any
training starts. The arguments are :class:`~rkd.outputs.DetectorInfo` or
:class:`~rkd.outputs.ClassifierInfo` alike (both have ``level_channels`` and ``strides``).

>>> from rkd.outputs import ClassifierInfo
>>> a = ClassifierInfo(level_channels=(8, 16), strides=(8, 16), num_classes=3)
>>> b = ClassifierInfo(level_channels=(8, 16), strides=(4, 16), num_classes=3)
>>> check_same_grid("at", a, b, "attention maps")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: KD method 'at' compares attention maps location by location, but the student's strides [8, 16] ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def check_same_input_scale(name: str, student: Any, teacher: Any, compares: str) -> None:
    """``ValueError`` unless both models see the input at one scale: a classifier's ``resize_to``
    puts its maps on another grid than the strides alone say (detectors never resize)."""
    s_size, t_size = getattr(student, "resize_to", None), getattr(teacher, "resize_to", None)
    if s_size != t_size:
        seen = {None: "the input as given"}
        raise ValueError(
            f"KD method {name!r} compares {compares} location by location, but the student sees "
            f"{seen.get(s_size, f'its input resized to {s_size} px')} and the teacher "
            f"{seen.get(t_size, f'its input resized to {t_size} px')}: give both the same model.resize_to, "
            "or use a logit method (hinton, dkd)"
        )


def check_same_grid(name: str, student: Any, teacher: Any, compares: str = "feature maps") -> None:
    """``ValueError`` unless student and teacher feature maps share strides and input scale (hence spatial sizes)."""
    check_same_input_scale(name, student, teacher, compares)
    if tuple(student.strides) != tuple(teacher.strides):
        raise ValueError(
            f"KD method {name!r} compares {compares} location by location, but the student's strides "
            f"{list(student.strides)} differ from the teacher's {list(teacher.strides)}"
        )


def check_same_anchors(
    name: str, student: Any, teacher: Any, compares: str = "per-anchor outputs", grid: str = "feature maps"
) -> None:
    """``ValueError`` unless student and teacher heads have the same grid and anchors per location."""
    check_same_grid(name, student, teacher, grid)
    if student.num_anchors != teacher.num_anchors:
        raise ValueError(
            f"KD method {name!r} compares {compares}, but the student has {student.num_anchors} "
            f"anchors per location and the teacher {teacher.num_anchors}"
        )


def check_same_box_dim(name: str, student: Any, teacher: Any, switch: str) -> None:
    """``ValueError`` unless both heads regress boxes of the same size (``switch``: the part that needs it)."""
    if student.box_dim != teacher.box_dim:
        raise ValueError(
            f"KD method {name!r} ({switch}) compares box regressions, but the student regresses "
            f"{student.box_dim} values and the teacher {teacher.box_dim}"
        )


def check_same_levels(name: str, student: Any, teacher: Any) -> None:
    """``ValueError`` unless student and teacher have as many feature levels."""
    if student.num_levels != teacher.num_levels:
        raise ValueError(
            f"KD method {name!r} pairs levels, but the student has {student.num_levels} "
            f"and the teacher {teacher.num_levels}"
        )


def check_level_stride(name: str, student: Any, teacher: Any, index: int, level: str) -> None:
    """``ValueError`` unless level ``index`` (called ``level`` in the message) has one stride in both models."""
    check_same_input_scale(name, student, teacher, f"the {level} level")
    if student.strides[index] != teacher.strides[index]:
        raise ValueError(
            f"KD method {name!r} compares the {level} level location by location, but its stride "
            f"is {student.strides[index]} in the student and {teacher.strides[index]} in the teacher"
        )


def check_same_shapes(name: str, adapted: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
    """``ValueError`` unless the adapted student features and the teacher's have equal shapes at every level."""
    for lvl, (s, t) in enumerate(zip(adapted, teacher)):
        if s.shape != t.shape:
            raise ValueError(
                f"{name}: adapted student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
                f"differ at level {lvl}"
            )


__all__ = [
    "check_level_stride",
    "check_same_anchors",
    "check_same_box_dim",
    "check_same_grid",
    "check_same_input_scale",
    "check_same_levels",
    "check_same_shapes",
]
