"""Which queues are active and deleting a queue (core/queue_deletion.py): each field that keeps a
queue listed, and each refusal with its reason, on two replicas over the memory engines."""

from __future__ import annotations

import pytest

from conveyor.v1 import admin_service_pb2
from conveyor.v1.task_pb2 import Signature
from conveyor_server.core.errors import FailedPrecondition, NotFound
from conveyor_server.core.queue_deletion import active_queue
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


@pytest.mark.parametrize("field", ["ready", "delayed", "in_flight", "unroutable"])
def test_a_queue_holding_tasks_of_any_kind_is_active(field: str) -> None:
    info = admin_service_pb2.QueueInfo(name="q", **{field: 1})  # type: ignore[arg-type]
    assert active_queue(info, set())
    assert not active_queue(admin_service_pb2.QueueInfo(name="q"), set())


def test_a_paused_or_served_queue_is_active_though_empty() -> None:
    assert active_queue(admin_service_pb2.QueueInfo(name="q", paused=True), set())
    assert active_queue(admin_service_pb2.QueueInfo(name="q"), {"q"})
    assert not active_queue(admin_service_pb2.QueueInfo(name="q"), {"other"})


async def test_an_unknown_queue_is_not_found_with_its_reason(replicas: Replicas) -> None:
    with pytest.raises(NotFound) as raised:
        await replicas.a.admin.delete_queue("nowhere", force=False)
    assert str(raised.value) == "no queue named 'nowhere'"
    assert (raised.value.reason, raised.value.metadata) == ("QUEUE_NOT_FOUND", {"queue": "nowhere"})


async def test_a_queue_with_tasks_in_flight_is_refused_even_with_force(replicas: Replicas) -> None:
    await submit(replicas.a, lone(Signature(name="noop", id="busy", queue=QUEUE)))
    await lease_all(replicas.a)
    message = (f"queue {QUEUE!r} has 1 tasks in flight (leased to workers): not deleted; "
               "try again once they end")
    for force in (False, True):
        with pytest.raises(FailedPrecondition) as raised:
            await replicas.b.admin.delete_queue(QUEUE, force=force)
        assert str(raised.value) == message
    assert QUEUE in await replicas.a.broker.queues()
