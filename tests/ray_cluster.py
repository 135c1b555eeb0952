"""A real two-node Ray cluster on 127.0.0.1 for tests: a head with the job server and a second node.

Each node is a ``ray start --block`` process in its own session with its own temp
dir and fresh ports, stopped with SIGTERM (which stops what it started) - never
``ray stop``, which would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from rkd.deploy.submit import alive_nodes

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node opens by default, fresh (a second node on the same host must not reuse them)."""
    names = [
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    return [f"--{n}={free_port()}" for n in names]


# A head node takes ~30 s to stop gracefully; its processes are all in its own session, so after
# a short grace period the rest are killed with it (the test cluster's temp dir goes anyway).
GRACEFUL_STOP_S = 8


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every node at once (`ray start --block` stops the processes it started), then wait."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=GRACEFUL_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session), nothing else
            proc.wait(timeout=30)


def _wait(check, what: str, timeout: float = 300) -> None:  # a loaded 2-core machine starts nodes slowly
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"the test cluster did not come up: {what}")


@contextmanager
def two_node_cluster():
    """Yields ``(job server URL, GCS address)``."""
    temp_dir = tempfile.mkdtemp(prefix="rkdt-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs, dashboard = free_port(), free_port()
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    procs = []
    try:
        head_cmd = [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            *common,
            *node_ports(),
        ]
        procs.append(
            subprocess.Popen(
                head_cmd,
                env=env,
                stdout=open(f"{temp_dir}/head.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        address = f"http://127.0.0.1:{dashboard}"
        _wait(lambda: urllib.request.urlopen(f"{address}/api/version", timeout=2).status == 200, "job server")
        # A temp dir of its own, as on another machine: nodes sharing one would also share (and
        # clean up) each other's runtime_env working_dir copies.
        worker_cmd = [
            RAY,
            "start",
            f"--address=127.0.0.1:{gcs}",
            '--resources={"node2": 1}',
            f"--temp-dir={temp_dir}/n2",
            *common,
            *node_ports(),
        ]
        procs.append(
            subprocess.Popen(
                worker_cmd,
                env=env,
                stdout=open(f"{temp_dir}/node2.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait(lambda: alive_nodes(address) == 2, "second node")
        yield address, f"127.0.0.1:{gcs}"
    finally:
        _stop(list(reversed(procs)))
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
