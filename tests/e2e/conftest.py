"""End-to-end fixtures: servers and workers as real OS processes, and clients."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conveyor import Client
from tests.e2e.test_engines import FAST
from tests.fixtures.broker_services import drop_redis_prefix, ensure_redis, session_prefix, with_prefix
from tests.support.processes import Proc, Server
from tests.support.proxy import TcpProxy

# Starts two replicas with these extra environment variables (server settings); returns them.
StartReplicas = Callable[[Mapping[str, str]], tuple[Server, Server]]


@pytest.fixture
def sqlite_server(tmp_path: Path, procs: list[Proc]) -> Server:
    db = tmp_path / "conveyor.db"
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}")
    procs.append(server)
    return server


@pytest.fixture
async def client(sqlite_server: Server) -> AsyncIterator[Client]:
    async with Client(sqlite_server.address) as c:
        yield c


@pytest.fixture
def redis_replicas(tmp_path: Path, procs: list[Proc]) -> Iterator[StartReplicas]:
    """Starts two `conveyor serve` replicas sharing one Redis as broker and backend, under a key
    prefix of this test's own. At teardown every process of the test is stopped (workers first:
    they were started after the servers), then the prefix's keys are dropped, so nothing writes
    them again once they are gone."""
    url, prefix = ensure_redis(), session_prefix("rr")

    def start(env: Mapping[str, str]) -> tuple[Server, Server]:
        replicas = []
        for index in range(2):
            server = Server(tmp_path, with_prefix(url, f"{prefix}-broker"), with_prefix(url, f"{prefix}-backend"),
                            env={**FAST, **env}, name=f"replica-{index}", wait=False)
            procs.append(server)  # stopped even if it never gets ready
            server.wait_ready()
            replicas.append(server)
        return replicas[0], replicas[1]

    yield start
    for proc in reversed(procs):
        proc.stop()
    drop_redis_prefix(url, prefix)


@pytest.fixture
def redis_url(procs: list[Proc]) -> Iterator[str]:
    """The shared Redis, and a key prefix that is dropped afterwards."""
    url, prefix = os.environ.get("CONVEYOR_TEST_REDIS_URL") or ensure_redis(), session_prefix("e2e")
    yield with_prefix(url, prefix)
    for proc in reversed(procs):  # first, or a server still running writes keys after the drop
        proc.stop()
    drop_redis_prefix(url, prefix)


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy the test controls, in front of that Redis (point a URL at its address)."""
    target = urlsplit(redis_url)
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        yield proxy
