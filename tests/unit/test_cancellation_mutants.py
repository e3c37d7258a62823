"""Cancellation (core/cancellation.py): the edges mutation testing found unpinned (which cancelled
tasks are counted out of their queue until their message goes: queued ones of a cancelled
workflow, not running ones, not those a purge dropped, but a replacement queued elsewhere).
Memory engines, two replicas."""

from __future__ import annotations

from conveyor.v1 import task_pb2
from conveyor_server.core.withdrawn import WITHDRAWN_GROUP, counts
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, Engines, chain, engines, lone, submit, task
from tests.unit.test_replacement import as_task, step

__all__ = ["engines", "quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_cancelling_a_workflow_counts_out_only_its_steps_waiting_in_a_queue(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="c1"), task(task_id="c2")))
    assert sorted(await replicas.b.canceller.cancel(response.workflow_id)) == ["c1", "c2"]
    assert list(await replicas.backend.members(WITHDRAWN_GROUP)) == ["c1"], "c2 was never published"


async def test_a_cancelled_running_task_is_not_counted_out_of_its_queue(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="r1")))
    await lease_all(replicas.a)
    assert await replicas.b.canceller.cancel("r1") == ["r1"]
    assert await replicas.backend.members(WITHDRAWN_GROUP) == {}


async def test_tasks_ended_for_a_purge_are_not_counted_out_their_messages_are_gone(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="p1")), lone(task(task_id="p2")))
    dropped = await replicas.broker.purge(QUEUE)
    assert sorted(await replicas.b.canceller.end_purged(dropped, QUEUE)) == ["p1", "p2"]
    assert await replicas.backend.members(WITHDRAWN_GROUP) == {}


async def test_a_purge_that_ends_a_replaced_task_counts_out_its_replacement_still_queued_elsewhere(
    engines: Engines,
) -> None:
    # The purge dropped the replaced task's message (its queue), not the replacement's: that one
    # is still in its own queue, so it is counted out of it until a dispatcher drops it.
    await submit(engines.core, lone(task(task_id="t")))
    elsewhere = task_pb2.Signature(id="r", name="add", queue="other")
    await step(engines.core, replace={"t": as_task(elsewhere)})
    assert await engines.core.canceller.end_purged(["t"], QUEUE) == ["t", "r"]
    listed = await engines.backend.members(WITHDRAWN_GROUP)
    assert list(listed) == ["r"] and listed["r"].decode().startswith("other\n")
    assert (await counts(engines.backend)).keys() == {"other"}
