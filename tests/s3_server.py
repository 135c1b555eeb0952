"""A local S3-compatible server (moto) on 127.0.0.1, for tests of storage URIs.

It speaks the S3 protocol over HTTP, so pyarrow's S3 filesystem, Ray's storage and
rkd reach it exactly as they reach a cloud bucket; only the endpoint differs. The
URI carries the endpoint and (test-only) credentials, so processes started by Ray
need no environment of their own.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class S3:
    endpoint: str  # host:port
    bucket: str

    def uri(self, *parts: str) -> str:
        """``s3://KEY:SECRET@bucket/parts...?endpoint_override=...&scheme=http``."""
        path = "/".join(p.strip("/") for p in (self.bucket, *parts) if p)
        return f"s3://testing:testing@{path}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(self.uri())
        return fs

    def files(self, *parts: str) -> dict[str, bytes]:
        """Every object under ``parts``, by path relative to it."""
        import pyarrow.fs

        fs = self.filesystem()
        root = "/".join((self.bucket, *parts))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        out = {}
        for info in infos:
            if info.type == pyarrow.fs.FileType.File:
                with fs.open_input_stream(info.path) as fh:
                    out[info.path[len(root) + 1 :]] = fh.read()
        return out


@contextmanager
def s3_server() -> Iterator[S3]:
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3(f"{host}:{port}", f"rkd-{uuid.uuid4().hex[:8]}")
        admin, _ = pyarrow.fs.FileSystem.from_uri(s3.uri() + "&allow_bucket_creation=true")
        admin.create_dir(s3.bucket)
        yield s3
    finally:
        server.stop()
