"""Fixtures shared by test modules."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from ray_cluster import two_node_cluster

_SESSION_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point rkd's cache (mirrors of remote runs) at a folder of this test session.

    Set before any Ray cluster starts, so the test clusters' workers inherit it too and no
    test leaves files in the user's ``~/.cache/rkd``.
    """
    global _SESSION_CACHE
    if "RKD_CACHE_DIR" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="rkd-test-cache-")
        os.environ["RKD_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE is not None:
        os.environ.pop("RKD_CACHE_DIR", None)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_teacher_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of trained teachers (read by the driver only): a teacher another test
    trained is never reused behind a test's back; tests of the cache share one on purpose."""
    monkeypatch.setenv("RKD_TEACHER_CACHE", str(tmp_path_factory.mktemp("teacher-cache")))


@pytest.fixture(autouse=True)
def _own_prior_cache(tmp_path_factory, monkeypatch):
    """Each test its own machine-wide cache of prior stages (as for teachers)."""
    monkeypatch.setenv("RKD_PRIOR_CACHE", str(tmp_path_factory.mktemp("prior-cache")))


@pytest.fixture(autouse=True)
def _own_patch_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of decoded patches: a test of a miss never finds another test's entry."""
    monkeypatch.setenv("RKD_PATCH_CACHE", str(tmp_path_factory.mktemp("patch-cache")))


@pytest.fixture(autouse=True)
def _own_teacher_outputs(tmp_path_factory, monkeypatch):
    """Each test its own cache of teacher outputs (in-process trainings and the cache's own tests)."""
    monkeypatch.setenv("RKD_TEACHER_OUTPUTS", str(tmp_path_factory.mktemp("teacher-outputs")))


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
