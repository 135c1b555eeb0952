"""bench/kd_gain.py's table: pairing with a chosen baseline, wins, Wilcoxon p, baselines from other files.

The figures in docs/benchmarks.md are printed by this code, so its arithmetic is checked against
numpy/scipy computed here independently.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kd_gain():
    spec = importlib.util.spec_from_file_location("kd_gain_bench", ROOT / "bench" / "kd_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(config: str, seed: int, score: float, epochs: int = 4) -> dict:
    return {"config": config, "seed": seed, "map50": score, "epochs": epochs}


def test_rows_pair_each_seed_with_the_chosen_baseline(kd_gain):
    alone = {0: 0.90, 1: 0.88, 2: 0.91, 3: 0.86}
    kd = {0: 0.92, 1: 0.87, 2: 0.95, 3: 0.90}
    runs = [run("nokd-lr17", s, v) for s, v in alone.items()] + [run("kd", s, v) for s, v in kd.items()]
    runs.append(run("kd", 9, 0.99))  # a seed without its baseline twin: in the mean, not in the pairs
    rows = {r["config"]: r for r in kd_gain.summarise(runs, baseline="nokd-lr17")}

    diffs = np.array([kd[s] - alone[s] for s in alone], dtype=np.float64)
    gain = rows["kd"]["gain"]
    assert gain["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert (gain["low"], gain["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-12)
    assert rows["kd"]["wins"] == "3/4"
    assert rows["kd"]["p"] == pytest.approx(stats.wilcoxon(diffs).pvalue, abs=1e-12)
    assert rows["kd"]["n"] == 5 and rows["kd"]["mean"] == pytest.approx(np.mean([*kd.values(), 0.99]))
    assert "gain" not in rows["nokd-lr17"]
    # against the default baseline name there is nothing to pair with
    assert "gain" not in {r["config"]: r for r in kd_gain.summarise(runs)}["kd"]


def test_wilcoxon_is_undefined_without_a_difference(kd_gain):
    assert kd_gain.wilcoxon_p([0.0, 0.0, 0.0]) is None
    assert kd_gain.wilcoxon_p([0.01]) is None


def test_baseline_from_other_files_takes_only_the_baseline_and_own_runs_win(kd_gain):
    own = [run("nokd", 0, 0.80), run("hinton", 0, 0.85), run("hinton", 1, 0.86)]
    other = [run("nokd", 0, 0.10), run("nokd", 1, 0.82), run("nokd", 1, 0.82, epochs=8), run("hinton", 2, 0.99)]
    merged = kd_gain.with_baseline_from(own, [other, [run("nokd", 1, 0.50)]], "nokd")
    keys = sorted((r["config"], r["seed"], r["epochs"], r["map50"]) for r in merged)
    assert keys == sorted(
        [
            ("nokd", 0, 4, 0.80),
            ("hinton", 0, 4, 0.85),
            ("hinton", 1, 4, 0.86),
            ("nokd", 1, 4, 0.82),
            ("nokd", 1, 8, 0.82),
        ]
    )
    rows = {r["config"]: r for r in kd_gain.summarise([r for r in merged if r["epochs"] == 4])}
    assert rows["hinton"]["gain"]["mean"] == pytest.approx(((0.85 - 0.80) + (0.86 - 0.82)) / 2, abs=1e-12)


def test_markdown_row_carries_wins_and_p(kd_gain):
    runs = [run("nokd", s, 0.8 + 0.01 * s) for s in range(3)] + [run("kd", s, 0.82 + 0.012 * s) for s in range(3)]
    table = kd_gain.markdown(kd_gain.summarise(runs), metric="top-1")
    kd_line = next(line for line in table.splitlines() if line.startswith("| kd |"))
    cells = [c.strip() for c in kd_line.strip("|").split("|")]
    assert cells[-2] == "3/3" and cells[-1] == f"{stats.wilcoxon([0.02, 0.022, 0.024]).pvalue:.2f}"
    assert "paired gain over nokd" in table.splitlines()[0]
