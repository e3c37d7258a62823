"""End-to-end fixtures: servers and workers as real OS processes, and clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conveyor import Client
from tests.support.processes import Proc, Server

# Output of every process a test started, printed when the test fails.
_STARTED: list[Proc] = []


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Processes registered here are stopped after the test; their logs shown on failure."""
    _STARTED.clear()
    yield _STARTED
    for proc in reversed(_STARTED):
        proc.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if call.when == "call" and report.failed:  # type: ignore[attr-defined]
        for proc in _STARTED:
            report.sections.append((f"log of {' '.join(proc.argv[-6:])}", proc.output()[-4000:]))  # type: ignore[attr-defined]
    return report


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
