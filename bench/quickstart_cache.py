"""``make quickstart``'s search with and without the teacher-output cache, back to back (issue #17).

Runs ``rkd search`` on ``examples/quickstart.yaml`` (the spec ``make quickstart`` runs) with
``teacher.cache: off`` (every step runs the teacher, as before the cache) and ``auto`` from an
empty cache (a user's first search) and from the cache that run left (a second search of the
same teacher and data, another search space, say), ``--repeats`` times in that order, each with
``--fresh`` in its own output folder, and prints the wall time of each. The teacher is trained
(or found in rkd's teacher cache) by a warm-up search first, so every timed search reuses it:
the figures compare the student trials. Each search takes ``/tmp/rkd-train.lock``, so nothing
else trains meanwhile; run it on a quiet machine.

    .venv/bin/python bench/quickstart_cache.py --repeats 2 --out bench/results/quickstart_cache.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "quickstart.yaml"


def spec_with(cache: str, folder: Path) -> Path:
    """The quickstart spec with ``teacher.cache`` set, written to ``folder`` (paths made absolute)."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["teacher"]["cache"] = cache
    spec["search"]["space"] = str((SPEC.parent / spec["search"]["space"]).resolve())
    path = folder / f"quickstart-{cache}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def timed_search(spec: Path, output_dir: Path, outputs_cache: Path) -> float:
    env = {**os.environ, "RKD_TEACHER_OUTPUTS": str(outputs_cache)}
    command = [str(ROOT / ".venv" / "bin" / "rkd"), "search", str(spec), "--output-dir", str(output_dir), "--fresh"]
    with open("/tmp/rkd-train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON of every timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rkd-qs-") as tmp:
        folder = Path(tmp)
        specs = {cache: spec_with(cache, folder) for cache in ("off", "auto")}
        print("warm-up (the teacher):", f"{timed_search(specs['off'], folder / 'warm', folder / 'unused'):.1f}s")
        walls: dict[str, list[float]] = {"off": [], "auto, empty cache": [], "auto, kept outputs": []}
        for repeat in range(args.repeats):
            outputs = folder / f"outputs-{repeat}"  # empty: the first search with the cache fills it
            walls["off"].append(timed_search(specs["off"], folder / f"off-{repeat}", outputs))
            walls["auto, empty cache"].append(timed_search(specs["auto"], folder / f"cold-{repeat}", outputs))
            walls["auto, kept outputs"].append(timed_search(specs["auto"], folder / f"warm-{repeat}", outputs))
            print(repeat, {k: round(v[-1], 1) for k, v in walls.items()}, flush=True)
    base = statistics.mean(walls["off"])
    print("| teacher.cache | wall s (each) | mean | / off |\n|---|---|---:|---:|")
    for name, values in walls.items():
        mean = statistics.mean(values)
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {mean:.1f} | {mean / base:.2f} |")
    if args.out:
        record = {"walls": walls, "machine": f"{platform.node()} {os.cpu_count()} CPUs", "date": time.ctime()}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
