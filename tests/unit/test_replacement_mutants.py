"""Task replacement (core/replacement.py): the edges mutation testing found unpinned (the queue
and trace a replacement's tasks get, what each refusal says, the replaced task's lease and
history, reports in a batch, a replacement that ends twice).

On the memory engines of tests/unit/test_durability.py.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.app import Core
from conveyor_server.backends.base import Versioned
from conveyor_server.config import Limits, Settings
from conveyor_server.core.records import task_key
from tests.unit.test_durability import QUEUE, Engines, engines, lone, quick_repairs, submit, task
from tests.unit.test_replacement import as_task, drain, record_of, replaced_by, state, step, value

__all__ = ["engines", "quick_repairs"]  # fixtures used by the tests below
REPLACED = worker_service_pb2.OUTCOME_REPLACED
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def report(
    engines: Engines, replacements: dict[str, workflow_pb2.Workflow | None], allowed_queues: Collection[str] = (),
) -> dict[str, worker_service_pb2.AckStatus.ValueType]:
    """Lease every ready task to w1 and report, in the order given, each task id in
    `replacements` replaced by its canvas (None: a report without one, for a task that may not
    exist); returns the acks."""
    core = engines.core
    deliveries = await core.broker.fetch(QUEUE, 100, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    tokens = {lease.task_id: lease.token for lease in claim.leases}
    reports = [
        worker_service_pb2.TaskOutcome(
            task_id=task_id, lease_token=tokens.get(task_id, "none"), outcome=REPLACED, replacement=canvas
        )
        for task_id, canvas in replacements.items()
    ]
    receipts = {lease.task_id: lease for lease in claim.leases}
    recorded = await core.connections.recorder.record(reports, "w1", receipts, allowed_queues)
    return recorded.statuses


async def refusal_of(engines: Engines, task_id: str) -> tuple[str, str]:
    """The error type and message the refused replacement failed the task with."""
    result = await record_of(engines.core, task_id)
    assert result.state == result_pb2.TASK_STATE_FAILURE
    return result.error.type, result.error.message


# -- what a replacement's tasks get ------------------------------------------------------------------

async def test_replacement_tasks_naming_no_queue_go_to_the_default_queue(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t")))
    queueless = task_pb2.Signature(name="noop", id="r")
    acks = await report(engines, {"t": as_task(queueless)}, allowed_queues=(QUEUE,))
    assert acks == {"t": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert await replaced_by(engines.core, "t"), "a worker limited to the default queue may use it"
    assert (await record_of(engines.core, "r")).queue == QUEUE
    await drain(engines.core)
    assert await state(engines.core, "t") == "SUCCESS"


async def test_replacement_tasks_join_the_trace_of_the_task_they_replace(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t", headers={"traceparent": TRACEPARENT})))
    await step(engines.core, replace={"t": as_task(task(task_id="r"))})
    assert (await record_of(engines.core, "r")).signature.headers["traceparent"] == TRACEPARENT


# -- what a refusal says ------------------------------------------------------------------------------

async def test_a_report_of_replaced_without_a_replacement_says_what_to_set(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t")))
    await report(engines, {"t": None})
    assert await refusal_of(engines, "t") == (
        "InvalidReplacement", "task t: OUTCOME_REPLACED without a replacement: set TaskOutcome.replacement"
    )


async def test_a_replacement_whose_task_could_not_be_read_when_checked_fails_it(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t")))
    backend, read = engines.backend, engines.backend.get

    async def misses_once(keys: Sequence[str]) -> dict[str, Versioned]:
        # The check reads no record of t (as a replica lagging behind); the write finds it.
        backend.get = read  # type: ignore[method-assign]
        return {k: v for k, v in (await read(keys)).items() if k != task_key("t")}

    deliveries = await engines.core.broker.fetch(QUEUE, 100, 30.0)
    claim = await engines.core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    backend.get = misses_once  # type: ignore[method-assign]
    replaced = worker_service_pb2.TaskOutcome(
        task_id="t", lease_token=claim.leases[0].token, outcome=REPLACED, replacement=as_task(task(task_id="r"))
    )
    receipts = {lease.task_id: lease for lease in claim.leases}
    await engines.core.connections.recorder.record([replaced], "w1", receipts)
    assert await refusal_of(engines, "t") == ("InvalidReplacement", "task t: the replacement could not be checked")


async def test_a_replacement_reusing_many_task_ids_names_the_first_five(engines: Engines) -> None:
    taken = [f"e{i}" for i in range(1, 7)]
    await submit(engines.core, *(lone(task(task_id=t)) for t in taken))
    await drain(engines.core)
    await submit(engines.core, lone(task(task_id="t")))
    group = workflow_pb2.Workflow(group=workflow_pb2.Group(members=[as_task(task(task_id=t)) for t in taken]))
    await report(engines, {"t": group})
    _kind, message = await refusal_of(engines, "t")
    assert message == "task t: the replacement uses task ids that already exist: e1, e2, e3, e4, e5"


async def test_replacements_nested_past_the_limit_say_how_the_nesting_counts(engines: Engines) -> None:
    settings = Settings(broker_url="memory://", backend_url="memory://", limits=Limits(max_workflow_depth=1))
    core = Core.build(settings, engines.broker, engines.backend)
    await submit(core, lone(task(task_id="t0")))
    await step(core, replace={"t0": as_task(task(task_id="t1"))})
    await step(core, replace={"t1": as_task(task(task_id="t2"))})
    _kind, message = await refusal_of(engines, "t1")
    assert message == (
        "task t1: replacements nest deeper than the limit of 1 (a task of a replacement replaced in turn counts "
        "one more; max_workflow_depth)"
    )


# -- the replaced task --------------------------------------------------------------------------------

async def test_a_replaced_task_holds_no_lease(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t")))
    await step(engines.core, replace={"t": as_task(task(task_id="r"))})
    record = await engines.core.store.get("t")
    assert record is not None and record.replaced_by and not record.lease_token


async def test_a_task_whose_replacement_failed_keeps_the_error_in_its_history(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t")))
    await step(engines.core, replace={"t": as_task(task(task_id="r"))})
    await drain(engines.core, fail=frozenset({"r"}))
    last = (await record_of(engines.core, "t")).history[-1]
    assert (last.state, last.error.type, last.error.message) == (result_pb2.TASK_STATE_FAILURE, "Boom", "r")


async def test_replacements_in_a_batch_are_checked_past_reports_for_missing_or_ended_tasks(
    engines: Engines,
) -> None:
    await submit(engines.core, lone(task(task_id="done")))
    await drain(engines.core)
    await submit(engines.core, lone(task(task_id="t")))
    acks = await report(engines, {"missing": None, "done": None, "t": as_task(task(task_id="r"))})
    assert acks == {
        "missing": worker_service_pb2.ACK_STATUS_STALE_LEASE,
        "done": worker_service_pb2.ACK_STATUS_ALREADY_DONE,
        "t": worker_service_pb2.ACK_STATUS_ACCEPTED,
    }
    assert await replaced_by(engines.core, "t")


async def test_a_replacement_that_ends_again_ends_its_task_and_runs_its_callbacks_once(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t", on_success=[task(task_id="t-ok")])))
    await step(core, replace={"t": as_task(task(task_id="r"))})
    plan = await core.store.plan(await replaced_by(core, "t"))
    assert plan is not None
    await drain(core)
    ended = (await core.store.load(["t"]))["t"].version
    again = records_pb2.NodeOutcome(ok=True, value=value(5), state=result_pb2.TASK_STATE_SUCCESS)
    await core.connections.recorder.followups.replacements.finish(plan, again, False)
    assert (await core.store.load(["t"]))["t"].version == ended
    assert (await record_of(core, "t")).result.int_value == 1
    assert engines.broker.published["t-ok"] == 1
