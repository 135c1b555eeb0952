"""The teacher's headroom: how far the teacher scores above the best student trained without KD.

Distillation hands the student what the teacher knows and the student does not learn alone. When
the best no-KD student of a search already scores as high as the teacher on the validation set,
the teacher has no measured knowledge to add, and the KD methods that imitate it are expected to
tie the student alone: a stronger teacher (a larger backbone, more epochs) is then the lever, not
the methods' parameters. Measured on AID with a pretrained EfficientNet-Lite0 student (0.884 top-1 alone, 10 seeds): a Lite0
teacher of 0.883 left every method tried within seed noise; with a Lite2 teacher of 0.910 Hinton KD
gained +0.016 [+0.007, +0.026] and Hinton KD + SSKD +0.021 [+0.013, +0.029] over 14 seeds at lr 1e-3
(bench/results/kd_gain_aid_lite2.json), and +0.012 [-0.004, +0.028] over the student at a better lr
(5 seeds, bench/results/kd_gain_aid_lite2_lr.json; docs/benchmarks.md). The converse does not hold:
the same Lite2 teacher seeing 224 px (0.938) passed on less than at 128 px (+0.007 against +0.016,
3 seeds): a margin the student cannot match is not knowledge it can take.

The search's no-KD trials are its reference point labelled ``no KD`` and any trial sampled with
every KD method off (:func:`rkd.search.results.no_kd_rows`); each is one seed, so a headroom within
a point or two of 0 is itself noisy.
"""

from __future__ import annotations

from typing import Any

from rkd.metrics import metric_label
from rkd.search.results import no_kd_rows


def teacher_headroom(teacher: dict[str, Any], rows: list[dict[str, Any]], accuracy: str) -> dict[str, Any] | None:
    """``teacher score - best no-KD student score`` with both sides, or ``None`` without a complete
    no-KD trial or a teacher score (``summary.json: teacher_headroom``)."""
    alone = no_kd_rows(rows, accuracy)
    if not alone or teacher.get(accuracy) is None:
        return None
    best = max(alone, key=lambda r: r[accuracy])
    return {
        "metric": accuracy,
        "teacher": float(teacher[accuracy]),
        "student_alone": float(best[accuracy]),
        "trial_id": best["trial_id"],
        "gflops": best.get("gflops"),
        "headroom": float(teacher[accuracy]) - float(best[accuracy]),
    }


def headroom_line(headroom: dict[str, Any] | None) -> str:
    """One line for ``rkd search``, ``rkd results`` and the report; empty without a headroom.

    >>> h = {"metric": "top1", "teacher": 0.883, "student_alone": 0.884, "trial_id": "t1", "headroom": -0.001}
    >>> headroom_line(h).split(":")[0]
    'teacher headroom -0.001 top-1'
    """
    if headroom is None:
        return ""
    label = metric_label(headroom["metric"])
    line = (
        f"teacher headroom {headroom['headroom']:+.3f} {label}: teacher {headroom['teacher']:.3f}, best student "
        f"without KD {headroom['student_alone']:.3f} (trial {headroom['trial_id']})"
    )
    if headroom["headroom"] <= 0:
        line += (
            ". The teacher scores no higher than the student alone, so distillation has little to pass on: "
            "expect KD to tie; a stronger teacher (larger backbone, more epochs) is the lever"
        )
    return line
