"""Start-up timeline: named instants of a run, for measuring where a trial's start-up goes.

Off unless ``RKD_TIMELINE`` names a file; then each :func:`mark` appends one JSON line
(``event``, wall-clock ``t``, ``pid``, ``run``) to it. Ray workers inherit the variable from the
driver's embedded Ray, so marks from trial, controller and worker processes land in one file.
"""

from __future__ import annotations

import json
import os
import time

ENV = "RKD_TIMELINE"


def mark(event: str, run: str | None = None) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), "run": run}) + "\n"
    with open(path, "a", encoding="utf-8") as fh:  # one short append: lines of processes do not interleave
        fh.write(line)
