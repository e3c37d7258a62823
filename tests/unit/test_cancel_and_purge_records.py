"""What a cancel and a purge leave behind (core/cancellation.py): a cancelled queued task is
counted out of its queue until its message is dropped, a purged one is not (its message is
gone); an unknown id is NotFound with its reason. Memory engines, two replicas."""

from __future__ import annotations

import pytest

from conveyor.v1 import result_pb2
from conveyor_server.core.errors import NotFound
from conveyor_server.core.withdrawn import WITHDRAWN_GROUP
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_purged_tasks_end_cancelled_and_are_not_counted_as_withdrawn(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="p1")), lone(task(task_id="p2")))
    assert await replicas.b.admin.purge(QUEUE) == 2
    for task_id in ("p1", "p2"):
        record = await replicas.a.store.get(task_id)
        assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
        assert record.result.error.type == "Purged"
        assert record.result.error.message == f"dropped from queue {QUEUE!r} by a purge"
    assert await replicas.backend.members(WITHDRAWN_GROUP) == {}


async def test_a_cancelled_queued_task_is_counted_out_until_its_message_goes(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="c1")))
    assert await replicas.b.canceller.cancel("c1") == ["c1"]
    assert list(await replicas.backend.members(WITHDRAWN_GROUP)) == ["c1"]
    record = await replicas.a.store.get("c1")
    assert record is not None and record.result.error.message == "cancelled by request (c1)"
    assert await replicas.a.canceller.cancel("c1") == [], "a second cancel ends nothing"


async def test_cancelling_an_unknown_id_is_not_found_with_its_reason(replicas: Replicas) -> None:
    with pytest.raises(NotFound) as raised:
        await replicas.a.canceller.cancel("ghost")
    assert str(raised.value) == "no task or workflow with id 'ghost'"
    assert (raised.value.reason, raised.value.metadata) == ("TASK_NOT_FOUND", {"task_id": "ghost"})
