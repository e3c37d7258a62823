"""The task store: the edges mutation testing found unpinned (read-modify-writes that start from
what the caller or this process already holds, and say so by needing no read; plans saved once).

On the shared memory engines of tests/unit/replicas.py; reads are made to fail to show that a
write needed none.
"""

from __future__ import annotations

from collections.abc import Callable

from conveyor.internal.v1 import records_pb2
from conveyor_server.core.planner import compile_workflow
from conveyor_server.core.signatures import filled
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def note(text: str) -> Callable[[str, records_pb2.TaskRecord], bool]:
    """A mutation that writes `text` into the record."""

    def mutate(_: str, record: records_pb2.TaskRecord) -> bool:
        record.result.progress.string_value = text
        return True

    return mutate


async def test_an_update_of_records_the_caller_just_read_reads_nothing_more(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    store = replicas.b.store  # it did not write t1, so it remembers nothing of it
    known = await store.load(["t1"])
    replicas.backend.fail_reads = 1_000
    written = await store.update(["t1"], note("from what was read"), known)
    assert written["t1"].result.progress.string_value == "from what was read"


async def test_consecutive_updates_in_one_process_read_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    store = replicas.a.store
    await store.update(["t1"], note("first"))
    replicas.backend.fail_reads = 1_000  # the next update starts from this process's own last write
    await store.update(["t1"], note("second"))
    replicas.backend.fail_reads = 0
    record = await replicas.b.store.get("t1")
    assert record is not None and record.result.progress.string_value == "second"


async def test_a_plan_is_saved_once(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    plan = await replicas.a.store.plan(response.workflow_id)
    assert plan is not None
    assert await replicas.b.store.save_plan(plan) is False, "it existed"
    fresh = compile_workflow(chain(task(task_id="c")).workflow, "wf-new", lambda s: filled(s, "default")).plan
    assert await replicas.b.store.save_plan(fresh) is True
