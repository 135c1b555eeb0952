"""``rkd submit / status / logs``: ``rkd search`` as a Ray Job on a running cluster.

The job's working directory is a temporary folder holding a copy of the spec
and of the search-space file it names (and of ``teacher.checkpoint`` if set),
rewritten to relative paths, so a spec written on a laptop is uploaded with the job. In the copy,
``resources.ray_address`` is ``auto`` (the job's driver joins the cluster it
runs on) and ``output_dir`` is the ``--storage`` location.

Storage rule: trial checkpoints are written by Train workers on any node and
the results by the driver on the head, so every node must reach the same
storage. A cluster with more than one node therefore needs ``--storage``: a
storage URI every node can write (``s3://bucket/runs``, ``gs://...``; see
:mod:`rkd.storage`), checked here with a small probe write before the job is
submitted, or an absolute path mounted at the same place on every node (NFS,
EFS, Filestore). On a single-node cluster ``--storage`` may be left out; the
run then goes to ``~/rkd-runs`` on the head node.
``data.root`` is read on the cluster (data is not uploaded), so it must be an
absolute path valid there.

A spec that names Python to import and run (a ``target:`` entry) is refused before anything is
submitted unless ``allow_code`` (``--allow-code``, or ``RKD_ALLOW_CODE=1`` here, as for ``rkd search``);
with it, the job's environment carries ``RKD_ALLOW_CODE=1`` so the search on the cluster runs that code too.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rkd.errors import RkdError
from rkd.schema import ALLOW_CODE_ENV
from rkd.storage import check_writable, is_uri

DEFAULT_RUNTIME_ENV = Path("clusters") / "runtime_env.yaml"
SPEC_NAME = "spec.yaml"
SPACE_NAME = "search_space.yaml"
TEACHER_NAME = "teacher.pt"
SINGLE_NODE_OUTPUT = "$HOME/rkd-runs"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobFailed(RkdError):
    """The job ran and did not succeed (exit code 1: not a problem with the command's input)."""

    exit_code = 1


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, an auth failure, or a malformed address
        raise RkdError(
            f"cannot reach the Ray job server at {address} ({type(exc).__name__}: {_explain(exc)}); "
            "pass the dashboard address of the head node, e.g. --address http://HEAD:8265"
        ) from None


def alive_nodes(address: str) -> int | None:
    """How many nodes of the cluster are alive, or None if the state API cannot tell."""
    from ray.util.state import list_nodes

    try:
        return len(list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False))
    except Exception:
        return None


def check_storage(storage: str | None, nodes: int | None) -> str | None:
    """The run's ``output_dir`` on the cluster (see the module doc for the rule)."""
    if storage is None:
        if nodes == 1:
            return None
        count = "more than one node" if nodes else "an unknown number of nodes"
        raise RkdError(
            f"the cluster has {count}: pass --storage, a folder mounted at the same path on every node "
            "(trial checkpoints are written on the workers' nodes and must be readable on the head)"
        )
    if is_uri(storage):
        check_writable(storage)  # from here: the nodes' credentials may differ, but a typo shows now
        return storage
    if not storage.startswith("/"):
        raise RkdError(f"--storage {storage}: give an absolute path (it is a path on the cluster's nodes)")
    return storage


def validate_spec(spec_path: Path) -> tuple[Any, Path]:
    """The loaded spec and its search-space file; errors name the user's file and line."""
    from rkd.search.config import parse_search
    from rkd.train.spec import load_spec

    root = _data_root(spec_path)
    if root is not None and not str(root).startswith("/"):
        # Relative to the spec here, but the copy lives in the job's working dir on the cluster.
        raise RkdError(
            f"{spec_path}: data.root: {root!r} is relative; for rkd submit give the absolute path "
            "where the data lives on the cluster's nodes (e.g. on the shared volume)"
        )
    spec = load_spec(spec_path)
    space = parse_search(spec).space_path
    if not space.is_file():
        raise RkdError(f"{spec_path}: search.space: {space} not found")
    return spec, space


def _data_root(spec_path: Path) -> Any:
    """``data.root`` as written in the file (None if absent or unreadable: the spec loader reports those)."""
    try:
        doc = yaml.safe_load(Path(spec_path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    return data.get("root") if isinstance(data, dict) else None


def prepare_working_dir(spec_path: Path, folder: Path, storage: str | None) -> dict[str, Any]:
    """Write the spec copy (and its search space) into ``folder``; returns the copy's document."""
    spec, space = validate_spec(spec_path)
    doc = copy.deepcopy(yaml.safe_load(Path(spec_path).read_text()))
    if spec.teacher_checkpoint is not None:
        # The spec loader has checked that it exists here: it travels with the job.
        shutil.copyfile(spec.teacher_checkpoint, folder / TEACHER_NAME)
        doc["teacher"]["checkpoint"] = TEACHER_NAME
    doc.setdefault("search", {})["space"] = SPACE_NAME
    doc.setdefault("resources", {})["ray_address"] = "auto"
    doc["name"] = spec.name
    if storage is not None:
        doc["output_dir"] = storage
    else:
        doc.pop("output_dir", None)
    shutil.copyfile(space, folder / SPACE_NAME)
    (folder / SPEC_NAME).write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


def load_runtime_env(path: Path | None) -> dict[str, Any]:
    """The runtime_env mapping from ``path`` (default: ``clusters/runtime_env.yaml`` if present)."""
    if path is None:
        if not DEFAULT_RUNTIME_ENV.is_file():
            return {}
        path = DEFAULT_RUNTIME_ENV
    if not Path(path).is_file():
        raise RkdError(f"{path}: runtime_env file not found")
    try:
        env = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise RkdError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(env, dict):
        raise RkdError(f"{path}: expected a mapping of runtime_env fields (env_vars, pip, ...)")
    if "working_dir" in env:
        raise RkdError(f"{path}: working_dir is set by rkd submit (the uploaded spec); remove it from the file")
    return env


def job_runtime_env(runtime_env: dict[str, Any], allow_code: bool) -> dict[str, Any]:
    """``runtime_env`` with the code opt-in in its ``env_vars`` when ``allow_code`` (the job's
    ``rkd search`` and its trial workers validate the spec again on the cluster)."""
    if not allow_code:
        return runtime_env
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise RkdError(f"runtime_env env_vars: expected a mapping of NAME: value, got {env_vars!r}")
    return {**runtime_env, "env_vars": {**env_vars, ALLOW_CODE_ENV: "1"}}


def submit(
    spec_path: Path,
    address: str,
    storage: str | None = None,
    wait: bool = True,
    runtime_env_file: Path | None = None,
    log: Callable[[str], None] = print,
    allow_code: bool = False,
) -> str:
    """Submit ``rkd search`` of ``spec_path`` to the cluster at ``address``; returns the job id.

    ``allow_code``: let the spec's ``target:`` entries run, here while validating and on the cluster.
    """
    spec_path = Path(spec_path)
    if allow_code:
        os.environ[ALLOW_CODE_ENV] = "1"  # the spec loader reads the opt-in from there, as under rkd.cli
    allow_code = os.environ.get(ALLOW_CODE_ENV) == "1"
    validate_spec(spec_path)  # before contacting the cluster: a typo (or unasked-for code) should not wait
    runtime_env = job_runtime_env(load_runtime_env(runtime_env_file), allow_code)
    if allow_code:
        log(
            f"{spec_path}: code allowed: the Python its `target:` entries name is imported and run on the "
            f"cluster ({ALLOW_CODE_ENV}=1 in the job's environment)"
        )
    jobs = client(address)
    output_dir = check_storage(storage, alive_nodes(address))
    with tempfile.TemporaryDirectory(prefix="rkd-submit-") as tmp:
        doc = prepare_working_dir(spec_path, Path(tmp), output_dir)
        entrypoint = f"python -m rkd.cli search {SPEC_NAME}"
        if output_dir is None:
            entrypoint += f' --output-dir "{SINGLE_NODE_OUTPUT}"'
        job_id = start_job(
            jobs,
            entrypoint,
            Path(tmp),
            runtime_env,
            job_id=f"rkd-{doc['name']}-{uuid.uuid4().hex[:8]}",
            metadata={"rkd_spec": str(spec_path.resolve()), "rkd_run": doc["name"]},
        )
    where = f"{output_dir}/{doc['name']}" if output_dir else f"{SINGLE_NODE_OUTPUT}/{doc['name']} on the head node"
    log(f"submitted job {job_id} to {address}; results will be in {where}")
    log(f"  follow it with: rkd logs {job_id} --address {shlex.quote(address)} --follow")
    if wait:
        follow_logs(address, job_id, log)
        finish(address, job_id)
    return job_id


def start_job(
    jobs: Any, entrypoint: str, working_dir: Path, runtime_env: dict[str, Any], job_id: str, metadata: dict[str, str]
) -> str:
    """Upload ``working_dir`` and start ``entrypoint`` in it as the Ray Job ``job_id``."""
    try:
        return jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={**runtime_env, "working_dir": str(working_dir)},
            metadata=metadata,
        )
    except RuntimeError as exc:  # the SDK reports HTTP errors (auth, a bad runtime_env) this way
        raise RkdError(f"the job server refused the job: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    text = str(exc)
    if "Authentication" in text or "401" in text or "403" in text:
        return (
            f"{text.splitlines()[0]} - this cluster uses Ray token authentication: "
            "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or put it in ~/.ray/auth_token)"
        )
    return text


def follow_logs(address: str, job_id: str, log: Callable[[str], None] = print) -> None:
    """Print the job's logs as they come, until the job ends."""
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            log(chunk.rstrip("\n"))

    asyncio.run(tail())


def finish(address: str, job_id: str) -> str:
    """The final status of a job that ended; a job that did not succeed raises :class:`JobFailed`."""
    info = client(address).get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    if status != "SUCCEEDED":
        raise JobFailed(f"job {job_id} {status}: {info.message or 'see rkd logs'}")
    return status


def job_status(address: str, job_id: str) -> dict[str, Any]:
    jobs = client(address)
    try:
        info = jobs.get_job_info(job_id)
    except RuntimeError as exc:  # the SDK's "job does not exist" (and HTTP errors)
        raise RkdError(f"job {job_id} at {address}: {_explain(exc)}") from None
    return {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata or {},
    }


def job_logs(address: str, job_id: str) -> str:
    try:
        return client(address).get_job_logs(job_id)
    except RuntimeError as exc:
        raise RkdError(f"job {job_id} at {address}: {_explain(exc)}") from None
