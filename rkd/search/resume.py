"""Whether a rerun of ``rkd search`` continues an earlier search of the same name, or starts afresh.

A search is identified by what makes two searches the same (:func:`search_identity`), recorded in
``RUN/search_identity.json``; :func:`prepare_resume` decides, :func:`start_afresh` clears.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from typing import Any

from ray import tune

from rkd import storage
from rkd.errors import RkdError
from rkd.search import confirm as confirm_stage
from rkd.search.config import SearchConfig
from rkd.train.checkpoint import atomic_write_json
from rkd.train.spec import RunSpec

SEARCH_IDENTITY_FILE = "search_identity.json"
RESULT_FILES = ("summary.json", "trials.parquet", "pareto.parquet", "pareto.png", "report.html")


def search_identity(spec: RunSpec, search: SearchConfig) -> dict[str, Any]:
    """What makes two searches the same search: a rerun resumes only an identical one."""
    identity = {
        "data": spec.data,
        "teacher": spec.teacher.to_dict(),
        "student": spec.student.to_dict(),
        "seed": spec.seed,
        # The confirm stage keeps its own record of what it trained (rkd.search.confirm): changing
        # it re-trains only what it lacks, never the search.
        "search": {k: v for k, v in asdict(search).items() if k not in ("space_path", "confirm")},
        "space": search.space_path.read_text(),
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from the file


def prepare_resume(spec: RunSpec, search: SearchConfig, mode: str) -> bool:
    """Decide whether this run continues an earlier one of the same name (``mode``: auto, resume, fresh).

    Returns True to resume. A search of the same spec is resumed: an interrupted one
    continues, a finished one just rewrites its results. What an earlier search of a
    different spec left, finished or interrupted, is never discarded without ``--fresh``:
    the user chooses that or another ``name``.
    """
    experiment = storage.join(spec.ray_storage, "search")
    if mode == "fresh":
        return False
    earlier_path = spec.run_dir / SEARCH_IDENTITY_FILE
    earlier = json.loads(earlier_path.read_text()) if earlier_path.is_file() else None
    restorable = tune.Tuner.can_restore(experiment)
    finished = (spec.run_dir / "summary.json").is_file()
    identity = search_identity(spec, search)
    same = earlier == identity
    if mode == "resume" and not restorable:
        raise RkdError(f"--resume: there is no interrupted search to resume in {experiment}")
    if (restorable or finished) and not (restorable and same):
        what = "an interrupted" if restorable and not finished else "a finished"
        changed = sorted(k for k, v in identity.items() if earlier is None or earlier.get(k) != v)
        why = f"made from a different spec (changed: {', '.join(changed)})" if not same else "whose Ray state is gone"
        raise RkdError(
            f"{spec.run_dir} holds {what} search {why}; nothing was changed. Give this search another `name` "
            f"(or --output-dir) to keep both, or rerun with --fresh to delete the earlier one"
        )
    return restorable and same


def start_afresh(spec: RunSpec, search: SearchConfig) -> None:
    """Clear what an earlier search of this name left, and record what this one is."""
    for old in (spec.run_dir / "ray" / "search", spec.run_dir / "ray" / "trials"):
        if old.exists():
            shutil.rmtree(old)
    for name in RESULT_FILES:  # from now on, this search is the unfinished one: no stale front may be read
        (spec.run_dir / name).unlink(missing_ok=True)
    confirm_stage.clear(spec.run_dir, spec.ray_storage, spec.run_uri)  # its pairs belong to the earlier trials
    atomic_write_json(spec.run_dir / SEARCH_IDENTITY_FILE, search_identity(spec, search))
    if spec.run_uri:
        for old_uri in (
            storage.join(spec.ray_storage, "search"),
            storage.join(spec.ray_storage, "trials"),
            *(storage.join(spec.run_uri, name) for name in RESULT_FILES),
        ):
            storage.delete(old_uri)
        storage.push(spec.run_dir / SEARCH_IDENTITY_FILE, storage.join(spec.run_uri, SEARCH_IDENTITY_FILE))
