"""End-to-end fixtures: servers and workers as real OS processes, and clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor import Client
from tests.support.processes import Proc, Server


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
