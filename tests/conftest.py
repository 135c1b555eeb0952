"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest
from ray_cluster import two_node_cluster


@pytest.fixture(scope="session")
def two_node_ray():
    """One real two-node Ray cluster on 127.0.0.1 for every test that needs several nodes
    (starting and stopping one costs about a minute): yields ``(job server URL, GCS address)``."""
    with two_node_cluster() as addresses:
        yield addresses


@pytest.fixture(scope="session")
def s3():
    """A local S3-compatible server with one bucket (see tests/s3_server.py)."""
    from s3_server import s3_server

    with s3_server() as server:
        yield server
