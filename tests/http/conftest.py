"""Fixtures of the HTTP API and task listing tests: the engines that keep a task index, each
with a key prefix of its own test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conveyor_server.backends._common import split_prefix
from tests.fixtures.broker_services import with_prefix

# Engines that keep a task index; memcached cannot (tested apart).
LISTING_ENGINES = ["memory", "sqlite", "redis", "redis_cluster", "mongodb"]


def own_prefix(url: str) -> str:
    """The URL with a prefix of its own under the session's (cleaned up with it)."""
    if url.startswith(("memory:", "sqlite:")):
        return url
    clean, prefix = split_prefix(url)
    return with_prefix(clean, f"{prefix}_{uuid.uuid4().hex[:6]}")


@pytest.fixture(params=LISTING_ENGINES)
def listing_backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'backend.db'}"
    return own_prefix(request.getfixturevalue(f"{request.param}_backend_url"))
