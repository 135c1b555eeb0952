"""How rkd's accuracy metrics are written for people; shared by training, search reports and export,
with no dependency (reports and ``rkd predict`` run without torch)."""

from __future__ import annotations

METRIC_LABELS = {"map50": "mAP50", "top1": "top-1"}  # a task's accuracy objective -> its label


def metric_label(metric: str) -> str:
    """How an accuracy metric is written for people (``map50`` -> ``mAP50``, ``top1`` -> ``top-1``).

    >>> metric_label("top1"), metric_label("latency_ms")
    ('top-1', 'latency_ms')
    """
    return METRIC_LABELS.get(metric, metric)
