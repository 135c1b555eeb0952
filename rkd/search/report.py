"""``rkd report RUN``: one self-contained HTML page about a finished search.

``RUN/report.html`` holds, with no external file or script:

* the front: every complete trial (accuracy — mAP50, or top-1 for classifiers — vs GFLOPs), the Pareto front line, the
  teacher and the students trained without KD marked (inline SVG);
* the hypervolume after each trial, in the order trials finished, against the
  run's reference point (``summary.json: hypervolume_ref``), so its last value is
  the run's hypervolume;
* parameter importances for mAP50 (see :func:`importances`);
* mAP50 per epoch of each trial, when Tune's per-trial ``result.json`` files exist;
* a table of every trial with its status and, for the others, why it is not complete.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rkd.atomic import atomic_write_text
from rkd.errors import RkdError
from rkd.metrics import metric_label
from rkd.search.headroom import headroom_line
from rkd.search.results import DEFAULT_OBJECTIVES, front_rows, hypervolume, knee, trials_path

W, H = 640, 380  # chart size in px
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 14, 40
PALETTE = ["#1f6feb", "#e08a00", "#2da44e", "#c62828", "#8250df", "#0a7f8f", "#bf3989", "#6e7781"]


# ---------------------------------------------------------------- data


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trials (rows of ``trials.parquet``) and ``summary.json`` (``{}`` if absent)."""
    rows = pq.read_table(trials_path(run_dir)).to_pylist()
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise RkdError(f"{summary_path}:{err.lineno}: not valid JSON: {err.msg}") from None
    return rows, summary


def read_curves(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per-trial epoch results from Tune's ``RUN/ray/search/<trial dir>/result.json`` (JSON lines).

    Returns ``{trial_id: [result, ...]}`` in epoch order; a torn last line (a trial
    killed mid-write) is skipped rather than failing the report.
    """
    curves: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((run_dir / "ray" / "search").glob("*/result.json")):
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(result, dict) and result.get("trial_id"):
                curves.setdefault(str(result["trial_id"]), []).append(result)
    for results in curves.values():
        results.sort(key=lambda r: (_num(r.get("epoch")) or 0.0, _num(r.get("timestamp")) or 0.0))
    return curves


def creation_index(run_dir: Path, trial_ids: list[str]) -> dict[str, int]:
    """The order Tune created each trial in, from its folder ``<trainable>_<trial id>_<index>_<params>``.

    Tune's trial ids are random, so neither they nor the rows of ``trials.parquet`` give the
    order; trials whose folder is missing are left out.
    """
    names = [p.name for p in (run_dir / "ray" / "search").glob("*") if p.is_dir()]
    out = {}
    for tid in trial_ids:
        for name in names:
            m = re.search(rf"_{re.escape(str(tid))}_(\d+)(?:_|$)", name)
            if m:
                out[tid] = int(m.group(1))
                break
    return out


def finish_order(
    rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], created: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Trials in the order they finished, by their last reported ``timestamp``.

    ``created`` (:func:`creation_index`) gives the order trials started in (trial-id order
    where unknown): it breaks ties of the whole-second timestamps, and a trial that reported
    nothing (it failed on start) is placed right after the trial created before it.
    """
    created = created or {}
    by_start = sorted(rows, key=lambda r: (created.get(r["trial_id"], math.inf), r["trial_id"]))
    keyed, last = [], -math.inf
    for i, r in enumerate(by_start):
        stamps = [t for t in (_num(x.get("timestamp")) for x in curves.get(r["trial_id"], [])) if t is not None]
        last = max(stamps) if stamps else last
        keyed.append(((last, i), r))
    return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


def hypervolume_curve(rows: list[dict[str, Any]], ref_gflops: float, acc: str = "map50") -> list[float]:
    """Hypervolume of the complete trials among the first 1, 2, ... ``rows`` (in the given order)."""
    out, xs, ys = [], [], []
    for r in rows:
        if r["status"] == "complete" and _num(r.get(acc)) is not None and _num(r.get("gflops")) is not None:
            ys.append(r[acc])
            xs.append(r["gflops"])
        out.append(hypervolume(np.array(ys, dtype=float), np.array(xs, dtype=float), ref_gflops) if xs else 0.0)
    return out


def importances(rows: list[dict[str, Any]], acc: str = "map50") -> list[tuple[str, float, int]]:
    """How much of the variance of mAP50 (complete trials) each searched parameter explains.

    A one-way analysis of variance per parameter: trials are grouped by the parameter's value
    (a category, or one of up to 4 equal-count bins of a number; a trial where the parameter
    was not sampled because its method was off forms its own group), and the estimate is
    omega squared, ``(SS_between - (k-1) MS_within) / (SS_total + MS_within)``, clipped at 0.
    Unlike the raw share ``SS_between / SS_total`` it does not grow just because there are
    many groups of few trials. Parameters are judged one at a time (interactions are not
    separated), which suits the few dozen trials a distillation search affords.
    (Optuna's fANOVA needs scikit-learn and drops conditional parameters.)

    Returns ``(parameter, omega squared, groups)`` sorted by importance.
    """
    done = [r for r in rows if r["status"] == "complete" and _num(r.get(acc)) is not None]
    y = np.array([r[acc] for r in done], dtype=float)
    if len(done) < 3 or float(np.var(y)) == 0.0:
        return []
    out = []
    for col in sorted({k for r in done for k in r if k.startswith("param.")}):
        labels = _groups([r.get(col) for r in done])
        k = len(set(labels))
        if k < 2 or k >= len(done):
            continue  # constant, or one trial per group: nothing is left to estimate the noise
        mean = y.mean()
        ss_total = float(((y - mean) ** 2).sum())
        groups = np.array(labels)
        ss_between = sum(float((groups == g).sum() * (y[groups == g].mean() - mean) ** 2) for g in set(labels))
        ms_within = (ss_total - ss_between) / (len(done) - k)
        omega = max(0.0, (ss_between - (k - 1) * ms_within) / (ss_total + ms_within))
        out.append((col[len("param.") :], omega, k))
    return sorted(out, key=lambda t: (-t[1], t[0]))


def _groups(values: list[Any]) -> list[str]:
    """A group label per value: ``off`` (not sampled), the value itself, or a quantile bin of numbers."""
    numeric = [v for v in values if _is_number(v)]
    if len(set(numeric)) <= 4:  # few distinct numbers (a choice): each value is its own group
        return ["off" if v is None else repr(v) for v in values]
    bins = min(4, max(2, len(numeric) // 3))
    edges = np.quantile(np.array(numeric, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])

    def label(v: Any) -> str:
        if v is None:
            return "off"
        return f"bin{int(np.searchsorted(edges, v, side='right'))}" if _is_number(v) else repr(v)

    return [label(v) for v in values]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------- SVG


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


class _Chart:
    """Linear axes mapping data to the SVG box; collects elements, renders with axes and labels."""

    def __init__(self, xs: list[float], ys: list[float], xlabel: str, ylabel: str) -> None:
        self.xt = _ticks(min(xs + [0.0]), max(xs + [1e-9]) * 1.05)
        self.yt = _ticks(min(ys + [0.0]), max(ys + [1e-9]) * 1.05)
        self.xlabel, self.ylabel, self.items = xlabel, ylabel, []

    def x(self, v: float) -> float:
        return PAD_L + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * (W - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return H - PAD_B - (v - self.yt[0]) / (self.yt[-1] - self.yt[0]) * (H - PAD_T - PAD_B)

    def point(
        self, x: float, y: float, title: str, shape: str = "circle", color: str = "#9aa5b1", r: float = 4.5
    ) -> None:
        cx, cy, t = self.x(x), self.y(y), f"<title>{html.escape(title)}</title>"
        if shape == "square":
            box = f'x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}"'
            self.items.append(f'<rect {box} fill="{color}">{t}</rect>')
        elif shape == "star":
            pts = " ".join(
                f"{cx + (r * 2 if i % 2 == 0 else r) * math.sin(i * math.pi / 5):.1f},"
                f"{cy - (r * 2 if i % 2 == 0 else r) * math.cos(i * math.pi / 5):.1f}"
                for i in range(10)
            )
            self.items.append(f'<polygon points="{pts}" fill="{color}">{t}</polygon>')
        else:
            self.items.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{color}">{t}</circle>')

    def line(self, xs: list[float], ys: list[float], color: str, title: str = "", width: float = 1.8) -> None:
        pts = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in zip(xs, ys))
        t = f"<title>{html.escape(title)}</title>" if title else ""
        style = f'fill="none" stroke="{color}" stroke-width="{width}"'
        self.items.append(f'<polyline points="{pts}" {style}>{t}</polyline>')

    def render(self, legend: list[tuple[str, str]] = ()) -> str:
        axes = []
        for v in self.xt:
            axes.append(f'<line x1="{self.x(v):.1f}" x2="{self.x(v):.1f}" y1="{PAD_T}" y2="{H - PAD_B}" class="grid"/>')
            axes.append(f'<text x="{self.x(v):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{v:g}</text>')
        for v in self.yt:
            axes.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" class="grid"/>')
            axes.append(f'<text x="{PAD_L - 6}" y="{self.y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        xlabel = html.escape(self.xlabel)
        axes.append(f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 6}" text-anchor="middle">{xlabel}</text>')
        axes.append(
            f'<text transform="translate(14,{(PAD_T + H - PAD_B) / 2}) rotate(-90)" text-anchor="middle">'
            f"{html.escape(self.ylabel)}</text>"
        )
        keys = [
            f'<rect x="{W - PAD_R - 150}" y="{PAD_T + 6 + 16 * i}" width="10" height="10" fill="{c}"/>'
            f'<text x="{W - PAD_R - 134}" y="{PAD_T + 15 + 16 * i}">{html.escape(n)}</text>'
            for i, (n, c) in enumerate(legend)
        ]
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}">'
            + "".join(axes + self.items + keys)
            + "</svg>"
        )


def front_svg(
    rows: list[dict[str, Any]], front: list[dict[str, Any]], teacher: dict[str, Any] | None, acc: str = "map50"
) -> str:
    done = [
        r
        for r in rows
        if r["status"] == "complete" and _num(r.get(acc)) is not None and _num(r.get("gflops")) is not None
    ]
    pts = [(r["gflops"], r[acc]) for r in done]
    if teacher and _num(teacher.get("gflops")) is not None and _num(teacher.get(acc)) is not None:
        pts.append((teacher["gflops"], teacher[acc]))
    if not pts:
        return "<p>No complete trial: nothing to plot.</p>"
    chart = _Chart(
        [p[0] for p in pts],
        [p[1] for p in pts],
        "student GFLOPs (lower is better)",
        f"val {metric_label(acc)} (higher is better)",
    )
    if front:
        chart.line([r["gflops"] for r in front], [r[acc] for r in front], PALETTE[0], "Pareto front")
    on_front = {r["trial_id"] for r in front}
    for r in done:
        kd = r.get("kd_methods") or "none"
        title = f"{r['trial_id']}: {metric_label(acc)} {r[acc]:.4f}, {r['gflops']:.4g} GFLOPs, KD: {kd}"
        color = PALETTE[0] if r["trial_id"] in on_front else "#9aa5b1"
        chart.point(
            r["gflops"],
            r[acc],
            title,
            "circle" if r.get("kd_methods") else "square",
            color if r.get("kd_methods") else PALETTE[1],
        )
    legend = [("distilled trial", "#9aa5b1"), ("on the front", PALETTE[0]), ("student, no KD", PALETTE[1])]
    if len(pts) > len(done):
        tx, ty = pts[-1]
        chart.point(tx, ty, f"teacher: {metric_label(acc)} {ty:.4f}, {tx:.4g} GFLOPs", "star", PALETTE[3], 6)
        legend.append(("teacher", PALETTE[3]))
    return chart.render(legend)


def hypervolume_svg(curve: list[float]) -> str:
    chart = _Chart([1.0, float(len(curve))], curve + [0.0], "trials finished", "hypervolume")
    chart.line([float(i + 1) for i in range(len(curve))], curve, PALETTE[0])
    for i, v in enumerate(curve):
        chart.point(i + 1, v, f"after {i + 1} trials: {v:.6g}", color=PALETTE[0], r=3)
    return chart.render()


def evaluated_points(results: list[dict[str, Any]], acc: str = "map50") -> list[tuple[float, float]]:
    """(epoch, mAP50) of the epochs that were evaluated.

    The training loop evaluates every ``eval_every`` epochs (default: the last only) and
    reports the last mAP50 it measured in between, 0 before the first evaluation
    (``val_images`` 0). Those carried values are dropped: an epoch never evaluated, and a
    value repeating the previous one (except the last epoch's), so the curve joins measurements.
    """
    pts = []
    for i, x in enumerate(results):
        epoch, map50 = _num(x.get("epoch")), _num(x.get(acc))
        if epoch is None or map50 is None or x.get("val_images") == 0:
            continue
        if pts and pts[-1][1] == map50 and i + 1 < len(results):
            continue
        pts.append((epoch, map50))
    return pts


def curves_svg(curves: dict[str, list[dict[str, Any]]], trial_ids: list[str], acc: str = "map50") -> str:
    series = [(tid, pts) for tid in trial_ids if (pts := evaluated_points(curves.get(tid, []), acc))]
    if not series:
        return ""
    chart = _Chart(
        [e for _, p in series for e, _ in p], [m for _, p in series for _, m in p], "epoch", f"val {metric_label(acc)}"
    )
    for i, (tid, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        chart.line([e for e, _ in pts], [m for _, m in pts], color, tid, 1.4)
        for e, m in pts:
            chart.point(e, m, f"{tid} epoch {e:g}: {metric_label(acc)} {m:.4f}", color=color, r=2.5)
    return chart.render([(tid, PALETTE[i % len(PALETTE)]) for i, (tid, _) in enumerate(series[: len(PALETTE)])])


# ---------------------------------------------------------------- page

CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}svg text{font-size:11px;fill:#57606a}
svg .grid{stroke:#d0d7de;stroke-width:.6}table{border-collapse:collapse;font-size:12px}
td,th{border-bottom:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
.complete{color:#1a7f37}.stopped{color:#9a6700}.failed,.diverged{color:#cf222e}.infeasible{color:#6e7781}
.bar{display:inline-block;height:10px;background:#1f6feb}details{font-size:11px}"""


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def trials_html(rows: list[dict[str, Any]], front_ids: set[str], knee_id: str | None, acc: str = "map50") -> str:
    head = [
        "trial",
        "status",
        metric_label(acc),
        "GFLOPs",
        "params (M)",
        "epochs",
        "KD methods",
        "wall s",
        "parameters",
        "reason",
    ]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        mark = " (knee)" if r["trial_id"] == knee_id else " (front)" if r["trial_id"] in front_ids else ""
        params = ", ".join(
            f"{k[len('param.') :]}={_cell(v)}" for k, v in r.items() if k.startswith("param.") and v is not None
        )
        reason = r.get("reason") or ""
        reason = html.escape(reason[:300]) + ("..." if len(reason) > 300 else "")  # a traceback tail can be long
        status = html.escape(str(r["status"]))
        cells = [
            f"{html.escape(str(r['trial_id']))}{mark}",
            _cell(r.get(acc)),
            _cell(r.get("gflops")),
            _cell(r.get("params_m")),
            f"{_cell(r.get('epochs_done'))}/{_cell(r.get('epochs'))}",
            _cell(r.get("kd_methods") or "none"),
            _cell(r.get("wall_s"), 3),
            f"<details><summary>show</summary>{params}</details>",
            reason,
        ]
        cells.insert(1, f'<span class="{status}">{status}</span>')
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def hypervolume_html(ordered: list[dict[str, Any]], curve: list[float]) -> str:
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(str(r['trial_id']))}</td><td>{v:.10g}</td></tr>"
        for i, (r, v) in enumerate(zip(ordered, curve))
    )
    return (
        "<h2>Hypervolume after each trial</h2><p>Hypervolume of the complete trials among the first n trials, "
        "in the order trials finished (their last reported timestamp).</p>"
        + (hypervolume_svg(curve) if curve else "<p>No trial.</p>")
        + '<table id="hypervolume"><tr><th>trials</th><th>last trial</th><th>hypervolume</th></tr>'
        + rows
        + "</table>"
    )


def importances_html(rows: list[dict[str, Any]], acc: str = "map50") -> str:
    out = (
        f"<h2>Parameter importance for {metric_label(acc)}</h2><p>Share of the variance of {metric_label(acc)} over complete "
        "trials explained "
        "by each parameter alone (bias-corrected one-way ANOVA, omega squared; a method's parameters form one "
        "group 'off' where the method was off).</p>"
    )
    imp = importances(rows, acc)
    if not imp:
        return out + f"<p>Too few complete trials (or no variation in {metric_label(acc)}) to estimate.</p>"
    body = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{v:.3f}</td><td>{k}</td>"
        f'<td><span class="bar" style="width:{200 * v:.0f}px"></span></td></tr>'
        for p, v, k in imp
    )
    return out + "<table><tr><th>parameter</th><th>importance</th><th>groups</th><th></th></tr>" + body + "</table>"


def confirm_html(confirm: dict[str, Any] | None) -> str:
    """The confirm stage (``summary.json: confirm``): each point against its no-KD twin over the same seeds."""
    if confirm is None:
        return ""
    from rkd.search.confirm import format_gain

    label = metric_label(confirm["metric"])
    out = (
        f"<h2>Confirmed gains over the student without KD</h2><p>Up to {confirm['top']} front points that use KD "
        "(the most accurate, the one of fewest GFLOPs, then points between) and their no-KD twins "
        "(same student, lr, epochs and data; KD off), each re-trained with seeds "
        f"{html.escape(str(confirm['seed_list']))}. Gain: the mean of the per-seed differences, with its "
        f"{confirm['level']:.0%} Student-t interval; where the interval includes 0 the gain is not told apart "
        "from seed noise.</p>"
    )
    if not confirm["points"]:
        return out + "<p>No front point uses KD: nothing to confirm.</p>"
    head = [
        "trial",
        "KD methods",
        "GFLOPs",
        f"search {label}",
        "seeds",
        f"{label} mean",
        "sd",
        "no-KD twin mean",
        "sd",
        "gain [interval]",
        "failed",
    ]
    body = []
    for p in confirm["points"]:
        cand, twin, gain = p["candidate"], p["twin"], p["gain"]
        verdict = format_gain(gain)
        # red where the interval includes 0 (not told apart from seed noise), green where it does not
        style = {True: ' class="failed"', False: ' class="complete"'}.get(gain.get("includes_zero"), "")
        cells = [
            html.escape(str(p["trial_id"])),
            _cell(p.get("kd_methods")),
            _cell(p.get("gflops")),
            _cell(p.get(f"search_{confirm['metric']}")),
            str(gain["n"]),
            _cell(cand["mean"]),
            _cell(cand["std"]),
            _cell(twin["mean"]),
            _cell(twin["std"]),
            f"<span{style}>{html.escape(verdict)}</span>",
            html.escape("; ".join(p.get("failed") or [])) or "-",
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head_html = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return out + f'<table id="confirm">{head_html}{"".join(body)}</table>'


def build_html(run_dir: Path) -> str:
    rows, summary = load_run(run_dir)
    curves = read_curves(run_dir)
    teacher = summary.get("teacher")
    objectives = tuple(summary.get("objectives", DEFAULT_OBJECTIVES))
    acc = objectives[0]  # the accuracy objective: map50 (detection) or top1 (classification)
    front = front_rows(rows, objectives)
    knee_id = (knee(front, acc) or {}).get("trial_id")
    if summary.get("hypervolume_ref"):
        ref = float(summary["hypervolume_ref"][1])
    else:  # the runner's rule, for a run folder without summary.json
        gflops = [r["gflops"] for r in rows if _num(r.get("gflops")) is not None]
        ref = max(gflops + ([teacher["gflops"]] if teacher else []) + [1e-9]) * 1.1
    ordered = finish_order(rows, curves, creation_index(run_dir, [r["trial_id"] for r in rows]))
    curve = hypervolume_curve(ordered, ref, acc)
    name = html.escape(str(summary.get("name") or run_dir.name))

    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    intro = f"{len(rows)} trials: " + ", ".join(f"{n} {html.escape(s)}" for s, n in counts.items()) + ". "
    if teacher:
        intro += f"Teacher: {metric_label(acc)} {_cell(teacher.get(acc))}, {_cell(teacher.get('gflops'))} GFLOPs. "
    headroom = headroom_line(summary.get("teacher_headroom"))
    if headroom:
        intro += html.escape(headroom[0].upper() + headroom[1:]) + ". "
    intro += (
        f"Front: {len(front)} trials; knee: {html.escape(str(knee_id or '-'))}; hypervolume "
        f"{curve[-1] if curve else 0.0:.6g} (reference: {metric_label(acc)} 0, {ref:.6g} GFLOPs)."
    )
    parts = [
        f"<h1>rkd search report: {name}</h1><p>{intro}</p>",
        "<h2>Pareto front</h2>",
        front_svg(rows, front, teacher, acc),
        confirm_html(summary.get("confirm")),
        hypervolume_html(ordered, curve),
        importances_html(rows, acc),
        f"<h2>{metric_label(acc)} per epoch</h2>",
        curves_svg(curves, [r["trial_id"] for r in ordered], acc)
        or "<p>No per-trial result files under ray/search/.</p>",
        "<h2>All trials</h2><p>In the order they finished.</p>",
        trials_html(ordered, {r["trial_id"] for r in front}, knee_id, acc),
    ]
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>rkd report: {name}</title>'
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    page = build_html(run_dir)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``rkd report RUN`` (wired into the top-level parser by :mod:`rkd.cli`)."""
    p = sub.add_parser("report", help="write RUN/report.html: front, hypervolume, importances, curves, all trials")
    p.add_argument("run", help="the run folder, runs/<name>, or its storage URI")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from rkd import storage

    # the per-trial curves are in ray/search; the trials' checkpoints are not needed
    path = write_report(storage.local_run(args.run, exclude=("ray/trials",)))
    if storage.is_uri(args.run):
        storage.push(path, storage.join(args.run, path.name))
        print(storage.join(args.run, path.name))
    else:
        print(path)
    return 0


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
