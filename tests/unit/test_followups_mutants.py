"""Follow-ups and their confirmed publishing: the edges mutation testing found unpinned (which
callbacks an ended task fires, a repeated follow-up pass that is not a repair, claims taken
over exactly at the grace, confirmations that write once).

On the shared memory engines of tests/unit/replicas.py; the claim clock is injected.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import result_pb2
from conveyor_server.core import confirmed
from conveyor_server.core.confirmed import CLAIM_GRACE_SECONDS, publish_confirmed, take_over
from conveyor_server.core.publisher import decode_message
from conveyor_server.core.records import new_record, transition
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_all, run_ready
from tests.unit.test_durability import QUEUE, Outage, lone, submit, task
from tests.unit.test_replacement import as_task
from tests.unit.test_replacement import step as worker_pass
from tests.unit.test_workflow_engine import chain_of, flow, step

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
T0 = 1_700_000_000


async def version(replicas: Replicas, task_id: str) -> int:
    return (await replicas.a.store.load([task_id]))[task_id].version


# -- which callbacks fire ------------------------------------------------------------------------

async def test_a_cancelled_task_fires_no_error_callback_and_a_failed_one_no_success_callback(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="cancelled", on_error=[task(name="alert")])))
    await submit(replicas.a, lone(task(task_id="failed", on_success=[task(name="next")])))
    await replicas.a.canceller.cancel("cancelled")
    ran = await run_all(replicas.a, fail={"failed"})
    assert set(ran) == {"failed"}
    assert await replicas.a.store.load(["cancelled.err0", "failed.ok0"]) == {}


async def test_an_error_callback_joins_the_trace_of_the_task_that_failed(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", on_error=[task(name="alert")], headers={"traceparent": "tp"})))
    await run_all(replicas.a, fail={"t1"})
    alert = await replicas.a.store.get("t1.err0")
    assert alert is not None
    assert alert.result.signature.headers["traceparent"] == "tp"


async def test_a_callback_of_a_workflow_step_goes_out_as_part_of_the_workflow(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, flow(chain_of(step("a", on_success=[task(name="cb")]), step("b"))))
    await run_ready(replicas.a)
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    [callback] = [decode_message(d.body) for d in deliveries if d.message_id == "a.ok0"]
    assert callback.workflow_id == response.workflow_id
    assert callback.attempt == 1


async def test_a_repeated_pass_that_is_no_repair_leaves_an_earlier_unpublished_callback_alone(
    replicas: Replicas,
) -> None:
    followups = replicas.a.connections.dispatcher.followups
    cause = result_pb2.TaskError(type="Boom", message="m")
    replicas.broker.fail_publishes = 1
    with pytest.raises(Outage):
        await followups.fire_callbacks("t1.err", [task(name="alert")], cause, "")
    # The same follow-up run again (a duplicate report, not a repair): the callback exists,
    # claimed moments ago by the first pass; this pass neither resends it nor waits for it.
    await followups.fire_callbacks("t1.err", [task(name="alert")], cause, "")
    assert replicas.broker.published["t1.err0"] == 0


# -- claims and confirmations --------------------------------------------------------------------

@pytest.fixture
def claim_clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    clock = SimpleNamespace(now=float(T0))
    monkeypatch.setattr(confirmed, "time", SimpleNamespace(time=lambda: clock.now))
    return clock


async def claimed_at(replicas: Replicas, task_id: str, seconds: int) -> None:
    """A follow-up record claimed for publishing at `seconds`, not confirmed."""
    await replicas.a.store.create([new_record(task(task_id=task_id), at=Timestamp(seconds=seconds))])


async def test_a_claim_exactly_the_grace_old_is_taken_over(replicas: Replicas, claim_clock: SimpleNamespace) -> None:
    await claimed_at(replicas, "cb", T0)
    claim_clock.now = T0 + CLAIM_GRACE_SECONDS
    [record] = (await replicas.a.store.load(["cb"])).values()
    taken = await take_over(replicas.a.store, [record.record])
    assert [r.result.task_id for r in taken] == ["cb"]


async def test_a_claim_confirmed_since_it_was_read_is_not_taken_over(
    replicas: Replicas, claim_clock: SimpleNamespace
) -> None:
    await claimed_at(replicas, "cb", T0)
    [read] = (await replicas.a.store.load(["cb"])).values()
    await publish_confirmed(replicas.a.store, replicas.a.submitter.publisher, [read.record], "")  # its claimer confirms
    claim_clock.now = T0 + 10 * CLAIM_GRACE_SECONDS
    assert await take_over(replicas.a.store, [read.record]) == []
    assert replicas.broker.published["cb"] == 1


async def test_confirming_a_publish_twice_writes_the_record_once(replicas: Replicas) -> None:
    await claimed_at(replicas, "cb", T0)
    [read] = (await replicas.a.store.load(["cb"])).values()
    await publish_confirmed(replicas.a.store, replicas.a.submitter.publisher, [read.record], "")
    confirmed_version = await version(replicas, "cb")
    await publish_confirmed(replicas.a.store, replicas.a.submitter.publisher, [read.record], "")
    assert await version(replicas, "cb") == confirmed_version


# -- a batch of ended tasks --------------------------------------------------------------------

async def test_a_replaced_task_in_a_repaired_batch_does_not_keep_the_tasks_after_it_from_their_callbacks(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="replaced")))
    await worker_pass(replicas.a, replace={"replaced": as_task(task(task_id="r"))})
    replaced = await replicas.a.store.get("replaced")
    assert replaced is not None and replaced.replaced_by, "it waits for its replacement"
    done = new_record(task(task_id="done", on_success=[task(name="next")]))
    transition(done, result_pb2.TASK_STATE_SUCCESS)
    # The repair of both, in one batch (as dispatch repairs ended tasks), the replaced task first.
    await replicas.a.connections.dispatcher.followups.after_terminal([replaced, done], repair=True)
    assert await replicas.a.store.get("done.ok0") is not None
