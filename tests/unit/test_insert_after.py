"""Backend.insert_after() on engines that send the member and the records in two calls
(backends/_common.DerivedWrites): the member goes first, so an insert that fails leaves an
outbox promise without its records (which the reconciler lets go), never records without it."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from conveyor_server.backends.base import GroupMember
from conveyor_server.backends.memory import MemoryBackend


class FailingInserts(MemoryBackend):
    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        raise ConnectionError("the engine went away")


async def test_a_failed_insert_leaves_the_member_it_came_after() -> None:
    backend = FailingInserts()
    await backend.connect()

    with pytest.raises(ConnectionError):
        await backend.insert_after(GroupMember("outbox", "promise", b"p", keep=True), {"task:t1": b"record"})

    assert await backend.members("outbox") == {"promise": b"p"}
    assert await backend.get(["task:t1"]) == {}
