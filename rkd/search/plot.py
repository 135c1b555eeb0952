"""``pareto.png``: a search's trials in the (GFLOPs, accuracy) plane, its Pareto front highlighted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rkd.atomic import atomic_write_bytes
from rkd.metrics import metric_label


def plot_front(
    rows: list[dict[str, Any]],
    front: list[dict[str, Any]],
    path: Path,
    teacher: dict[str, Any] | None,
    title: str,
    latency: bool = False,
    accuracy: str = "map50",
    confirmed: list[dict[str, Any]] | None = None,
) -> None:
    """``pareto.png``: all complete trials, the front highlighted, teacher and no-KD students marked.

    ``latency``: the front is over (mAP50, GFLOPs, latency); its points are coloured by latency.
    ``confirmed``: the confirm stage's points (``summary.json: confirm.points``), ringed and labelled
    with their gain over the no-KD twin.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = [r for r in rows if r["status"] == "complete"]
    kd = [r for r in done if r.get("kd_methods")]
    plain = [r for r in done if not r.get("kd_methods")]
    ax.scatter([r["gflops"] for r in kd], [r[accuracy] for r in kd], c="#9aa5b1", s=28, label="distilled trials")
    if plain:
        ax.scatter(
            [r["gflops"] for r in plain],
            [r[accuracy] for r in plain],
            marker="s",
            c="#e08a00",
            s=42,
            label="student, no KD",
        )
    if front and latency:
        # A front over three objectives is not a curve in this plane: mark its points, coloured by latency.
        dots = ax.scatter(
            [r["gflops"] for r in front],
            [r[accuracy] for r in front],
            c=[r["latency_ms"] for r in front],
            cmap="viridis",
            s=48,
            edgecolors="#1f6feb",
            label="Pareto front (mAP, GFLOPs, latency)",
        )
        fig.colorbar(dots, ax=ax, label="latency (ms)")
    elif front:
        ax.plot(
            [r["gflops"] for r in front],
            [r[accuracy] for r in front],
            "-o",
            c="#1f6feb",
            lw=1.8,
            ms=6,
            label="Pareto front",
        )
    if teacher is not None:
        ax.scatter([teacher["gflops"]], [teacher[accuracy]], marker="*", c="#c62828", s=160, label="teacher", zorder=5)
    published = [r for r in done if (r.get("reference") or "").endswith(" defaults")]
    if published:
        # What the search adds over picking a published method with its paper's settings.
        ax.scatter(
            [r["gflops"] for r in published],
            [r[accuracy] for r in published],
            marker="D",
            facecolors="none",
            edgecolors="#6a1b9a",
            s=60,
            label="method at published defaults",
            zorder=4,
        )
        for r in published:
            ax.annotate(
                r["reference"].removesuffix(" defaults"),
                (r["gflops"], r[accuracy]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
                color="#6a1b9a",
            )
    by_id = {r["trial_id"]: r for r in done}
    ringed = [(by_id[p["trial_id"]], p) for p in confirmed or [] if p["trial_id"] in by_id]
    if ringed:
        from rkd.search.confirm import format_gain

        ax.scatter(
            [r["gflops"] for r, _ in ringed],
            [r[accuracy] for r, _ in ringed],
            marker="o",
            facecolors="none",
            edgecolors="#1a7f37",
            s=140,
            linewidths=1.6,
            label="confirmed: gain over no-KD twin",
            zorder=6,
        )
        for r, p in ringed:
            ax.annotate(
                format_gain(p["gain"]).replace(" interval includes 0", " (includes 0)"),
                (r["gflops"], r[accuracy]),
                fontsize=7,
                xytext=(6, -12),
                textcoords="offset points",
                color="#1a7f37",
            )
    ax.set_xlabel("student GFLOPs (lower is better)")
    ax.set_ylabel(f"val {metric_label(accuracy)} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
