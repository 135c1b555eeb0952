"""Progress lines while a search runs: trial n/N, its epochs, the best so far, elapsed time."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from rkd.metrics import metric_label
from rkd.search.results import error_reason, loss_growth
from rkd.train.runner import epoch_score


def _fmt_elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def describe_params(config: dict[str, Any]) -> str:
    """A short one-line description of a trial's parameters.

    >>> describe_params({"student.model.backbone.width": 0.5, "methods.fitnet": True,
    ...                  "methods.fitnet.weight": 0.25, "methods.hinton": False})
    'width=0.5 | fitnet(weight=0.25)'
    """
    student = [f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in config.items() if k.startswith("student.")]
    methods = []
    for key, on in config.items():
        if key.startswith("methods.") and key.count(".") == 1 and on:
            name = key.split(".")[1]
            inner = [f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in config.items() if k.startswith(key + ".")]
            methods.append(f"{name}({', '.join(inner)})" if inner else name)
    return " ".join(student) + " | " + (" + ".join(methods) if methods else "no KD")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class ProgressPrinter(tune.Callback):
    """Prints one line per trial start, per epoch and per trial end."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        metric: str = "map50",
        describe: Callable[[dict[str, Any]], str] = describe_params,
        stage: str = "search",
        first_tag: int = 1,
    ) -> None:
        self.total, self.describe = total, describe  # describe: a trial's config in its start line
        self.stage = stage  # the lines' prefix: the search's trials, or the confirm stage's trainings
        # The number in the experiment tag of the first trial: a searcher's (the search) counts from 1,
        # a grid of variants (the confirm stage's jobs) from 0.
        self.first_tag = first_tag
        self.metric, self.label = metric, metric_label(metric)
        self.stream = stream  # None: sys.stdout at print time (Tune pickles callbacks; streams do not pickle)
        self.start = time.perf_counter()
        self.numbers: dict[str, int] = {}
        self.best: tuple[float, float] | None = None  # (accuracy, gflops) of the best complete trial
        self.finished = 0

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(f"[{self.stage} {_fmt_elapsed(time.perf_counter() - self.start)}] {text}", file=stream, flush=True)

    def _n(self, trial: Any, trials: list) -> str:
        # Numbered as Tune numbered it when it created it (its experiment tag starts with that number),
        # else by its place among all trials: a resumed search (whose callback starts empty) keeps the
        # numbers of the trials it restored. Not the place alone: a resume re-adds the restored trials
        # latest-reporting first, so a trial that was running comes before the finished ones.
        created = re.match(r"(\d+)(_|$)", str(getattr(trial, "experiment_tag", "") or ""))
        n = (
            int(created.group(1)) - self.first_tag + 1
            if created
            else next((i + 1 for i, t in enumerate(trials) if t.trial_id == trial.trial_id), None)
        )
        n = self.numbers.setdefault(trial.trial_id, n or len(self.numbers) + 1)
        return f"trial {n}/{self.total}"

    def _done(self, trials: list, trial: Any) -> int:
        """Trials finished so far, this one included (restored ones too)."""
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t.trial_id != trial.trial_id)
        self.finished = max(self.finished + 1, ended + 1)
        return self.finished

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"{self._n(trial, trials)} started: {self.describe(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result and "epochs" in result:
            self._say(
                f"{self._n(trial, trials)} epoch {result['epoch']}/{result['epochs']} loss {result.get('loss', float('nan')):.4f}"
                f" {epoch_score(result, self.metric)} ({result.get('images_per_s', 0):.1f} img/s)"
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        finished = self._done(trials, trial)
        last = trial.last_result or {}
        done = last.get("epoch") == last.get("epochs") and last.get("status") != "infeasible"
        grown = loss_growth(last) if done else None
        if done and not grown and self.metric in last:
            if self.best is None or last[self.metric] > self.best[0]:
                self.best = (last[self.metric], last.get("gflops", float("nan")))
        best = (
            f"best {self.label} {self.best[0]:.3f} at {self.best[1]:.3f} GFLOPs"
            if self.best
            else "no complete trial yet"
        )
        state = ("diverged" if grown else "complete") if done else last.get("status", "stopped")
        self._say(
            f"{self._n(trial, trials)} {state}: {self.label} {last.get(self.metric, float('nan')):.3f} GFLOPs "
            f"{last.get('gflops', float('nan')):.3f} | {finished}/{self.total} done, {best}"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        finished = self._done(trials, trial)
        try:
            text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
        except OSError:
            text = ""
        reason = error_reason(text) if text else "its error is in the trial's folder"
        state = "diverged" if "DivergenceError" in reason else "failed"
        self._say(f"{self._n(trial, trials)} {state} ({finished}/{self.total} done; the search goes on): {reason}")
