"""Run folders on shared storage: a local path, or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``...).

A multi-node Ray run needs storage every node can reach. Ray Train and Tune write their
own checkpoints and experiment state straight to such a URI; rkd's own files (the
teacher, prior-stage caches, ``trials.parquet``, ``pareto.png``...) are written to a local
*mirror* of the run folder with ordinary atomic file writes and then uploaded, each
file to a temporary name first and then moved into place, so a reader never sees half
a file. Files a training worker must read (the teacher checkpoint, a prior stage's
state) are passed to it as URIs and fetched into the node's mirror on first use.

A URI may carry ``pyarrow``'s query options, e.g.
``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`` for an S3-compatible
server; paths are joined before the query. Credentials come from the environment as the
storage's own tools expect (``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``...).

>>> join("s3://bucket/runs?scheme=http", "quick", "teacher.json")
's3://bucket/runs/quick/teacher.json?scheme=http'
>>> is_uri("runs/quick"), is_uri("s3://bucket/runs")
(False, True)
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Literal, overload

from rkd.errors import RkdError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations, False for plain paths."""
    return bool(_SCHEME.match(str(location)))


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path (its query string, if any, kept at the end)."""
    base, sep, query = uri.partition("?")
    path = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}{sep}{query}"


def resolve(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for ``uri``; a clear error when it cannot be used."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # unknown scheme, bad options, missing optional filesystem
        raise RkdError(f"{uri}: not a storage location pyarrow can open ({type(exc).__name__}: {exc})") from None


def to_uri(uri_like: str, fs_path: str) -> str:
    """The URI, on the same storage and with the same options as ``uri_like``, of ``fs_path``
    (a path inside that storage's filesystem, as Ray reports checkpoint paths)."""
    scheme, rest = uri_like.partition("?")[0].split("://", 1)
    query = uri_like.partition("?")[2]
    if scheme == "file":
        return "file://" + fs_path
    authority = rest.split("/", 1)[0]
    userinfo = authority.rsplit("@", 1)[0] + "@" if "@" in authority else ""  # s3://KEY:SECRET@bucket/...
    return f"{scheme}://{userinfo}{fs_path.lstrip('/')}" + (f"?{query}" if query else "")


def cache_root() -> Path:
    """Where mirrors of remote run folders live: ``$RKD_CACHE_DIR``, else ``~/.cache/rkd``."""
    return Path(os.environ.get("RKD_CACHE_DIR") or Path.home() / ".cache" / "rkd")


def mirror_dir(uri: str) -> Path:
    """The local folder that mirrors ``uri`` on this node (stable for the same URI)."""
    scheme, rest = uri.partition("?")[0].split("://", 1)
    authority, _, path = rest.partition("/")
    readable = f"{scheme}_{authority.rsplit('@', 1)[-1]}/{path}"  # never credentials in a folder name
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_")[-80:]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:10]
    return cache_root() / "storage" / f"{tail}-{digest}"


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _remote_files(uri: str) -> list[tuple[str, int, float]]:
    """``(relative path, size, mtime)`` of every file under ``uri`` (empty if it does not exist)."""
    import pyarrow.fs

    fs, root = resolve(uri)
    root = root.rstrip("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return [
        (i.path[len(root) + 1 :], i.size, i.mtime.timestamp() if i.mtime else 0.0)
        for i in infos
        if i.type == pyarrow.fs.FileType.File
    ]


def _excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    """Whether the relative path ``rel`` is one of the folders ``exclude`` or under one."""
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude)


def pull(uri: str, local: Path, exclude: tuple[str, ...] = ()) -> int:
    """Download what is under ``uri`` into ``local`` (files whose size differs or that are missing).

    ``exclude``: relative folder prefixes left out (``"ray/trials"``). Each file is written
    atomically. Returns the number of files fetched.
    """
    fs, root = resolve(uri)
    fetched = 0
    for rel, size, _ in _remote_files(uri):
        if _excluded(rel, exclude):
            continue
        target = local / rel
        if target.is_file() and target.stat().st_size == size:
            continue
        _download(fs, f"{root.rstrip('/')}/{rel}", target)
        fetched += 1
    return fetched


def _download(fs: Any, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            _copy_stream(src, dst)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def push(local: Path, uri: str, exclude: tuple[str, ...] = ()) -> int:
    """Upload the files under ``local`` (a file or a folder) to ``uri``, each atomically.

    Files already there with the same size and a modification time no older than the local
    file's are skipped.
    Returns the number of files uploaded.
    """
    fs, root = resolve(uri)
    root = root.rstrip("/")
    if local.is_file():  # a single file: compared with what is stored at uri itself
        files = [(local, "")]
        info = fs.get_file_info(root)
        remote = {"": (info.size, info.mtime.timestamp() if info.mtime else 0.0)} if info.is_file else {}
    else:
        files = [(p, p.relative_to(local).as_posix()) for p in sorted(local.rglob("*")) if p.is_file()]
        remote = {rel: (size, mtime) for rel, size, mtime in _remote_files(uri)}
    sent = 0
    for path, rel in files:
        if rel and _excluded(rel, exclude):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # another writer's half-written file
        stat = path.stat()
        # (object stores keep whole seconds: a copy uploaded after the file was written may
        # carry a time up to a second before the file's own)
        if rel in remote and remote[rel][0] == stat.st_size and remote[rel][1] + 1.0 >= stat.st_mtime:
            continue
        dest = f"{root}/{rel}" if rel else root
        _upload(fs, path, dest)
        sent += 1
    return sent


def _upload(fs: Any, path: Path, dest: str) -> None:
    parent, _, name = dest.rpartition("/")
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp" if parent else f".{name}.tmp"
    with open(path, "rb") as src, fs.open_output_stream(tmp) as dst:
        _copy_stream(src, dst)
    fs.move(tmp, dest)


def _copy_stream(src: Any, dst: Any) -> None:
    """Copy a readable stream into a writable one in 4 MB blocks (whole files never sit in memory)."""
    while block := src.read(1 << 22):
        dst.write(block)


def delete(uri: str) -> None:
    """Remove the folder ``uri`` and everything under it (nothing if it does not exist)."""
    import pyarrow.fs

    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


@overload
def local_copy(location: str | os.PathLike[str], missing_ok: Literal[False] = False) -> Path: ...
@overload
def local_copy(location: str | os.PathLike[str], missing_ok: bool) -> Path | None: ...


def local_copy(location: str | os.PathLike[str], missing_ok: bool = False) -> Path | None:
    """A local path for ``location``: itself if it is a path, else the file fetched into its mirror.

    The copy is fetched again when the stored file's size differs or it is newer. A URI with no
    file behind it is an error, or ``None`` with ``missing_ok`` (one request either way).
    """
    import pyarrow.fs

    if not is_uri(location):
        return Path(location)
    uri = str(location)
    base, _, query = uri.partition("?")
    parent, _, name = base.rpartition("/")
    target = mirror_dir(f"{parent}?{query}" if query else parent) / name
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pyarrow.fs.FileType.File:
        if missing_ok:
            return None
        raise RkdError(f"{uri}: no such file on the storage")
    fresh = (
        target.is_file()
        and target.stat().st_size == info.size
        and (info.mtime is None or info.mtime.timestamp() <= target.stat().st_mtime)
    )
    if not fresh:
        _download(fs, path, target)
    return target


def local_run(location: str | os.PathLike[str], exclude: tuple[str, ...] = ("ray",)) -> Path:
    """A run folder to read: a path as it is, or a URI's files (bar ``exclude``) pulled into its mirror.

    Trial checkpoints stay on the storage; :func:`local_copy` fetches the one that is needed.
    """
    if not is_uri(location):
        return Path(location)
    uri = str(location)
    if not exists(uri):
        raise RkdError(f"{uri}: nothing there; is it a run folder (output_dir/<name>)?")
    local = mirror_dir(uri)
    pull(uri, local, exclude=exclude)
    return local


def check_writable(uri: str) -> None:
    """Write and delete a small probe under ``uri``; a clear error if the storage refuses."""
    probe = join(uri, f".rkd-probe-{uuid.uuid4().hex[:8]}")
    fs, path = resolve(probe)
    try:
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(b"rkd")
        fs.delete_file(path)
    except Exception as exc:
        raise RkdError(f"{uri}: cannot write there ({type(exc).__name__}: {str(exc)[:300]})") from None


__all__ = [
    "cache_root",
    "check_writable",
    "delete",
    "exists",
    "is_uri",
    "join",
    "local_copy",
    "local_run",
    "mirror_dir",
    "pull",
    "push",
    "resolve",
    "to_uri",
]
