"""Task replacement (core/replacement.py) on the memory engines: a task that reports
OUTCOME_REPLACED waits for its replacement and then takes its outcome, wherever it stands in a
canvas; a report repeated, a start that fails and an invalid replacement change nothing twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.app import Core
from conveyor_server.core.connection import settle
from conveyor_server.core.replacement import Checked
from tests.unit.test_durability import QUEUE, Engines, chain, chord, engines, lone, quick_repairs, submit, task

__all__ = ["engines", "quick_repairs"]  # fixtures used by the tests below


def value(number: int) -> task_pb2.Value:
    return task_pb2.Value(int_value=number)


def as_task(signature: task_pb2.Signature) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(task=signature)


def as_chain(*steps: task_pb2.Signature) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=[as_task(s) for s in steps]))


async def step(
    core: Core, replace: Mapping[str, workflow_pb2.Workflow] | None = None,
    results: Mapping[str, task_pb2.Value] | None = None, fail: frozenset[str] = frozenset(),
) -> dict[str, worker_service_pb2.AckStatus.ValueType]:
    """One pass of a worker: each ready task is replaced (`replace`), fails (`fail`) or returns
    `results[id]` (default: its first arg plus 1, or 1); returns the acks by task id."""
    replace, results = replace or {}, results or {}
    deliveries = await core.broker.fetch(QUEUE, 100, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    await core.connections.dispatcher.drop_unrunnable(claim)
    outcomes = []
    for claimed in claim.claimed:
        task_id, token = claimed.lease.task_id, claimed.lease.token
        report = worker_service_pb2.TaskOutcome(
            task_id=task_id, lease_token=token, outcome=worker_service_pb2.OUTCOME_SUCCESS
        )
        if task_id in replace:
            report.outcome = worker_service_pb2.OUTCOME_REPLACED
            report.replacement.CopyFrom(replace[task_id])
        elif task_id in fail:
            report.outcome = worker_service_pb2.OUTCOME_FAILURE
            report.error.CopyFrom(result_pb2.TaskError(type="Boom", message=task_id))
        else:
            args = claimed.assignment.task.args
            report.result.CopyFrom(results.get(task_id, value(args[0].int_value + 1 if args else 1)))
        outcomes.append(report)
    if not outcomes:
        return {}
    receipts = {c.lease.task_id: c.lease for c in claim.claimed}
    recorded = await core.connections.recorder.record(outcomes, "w1", receipts)
    await settle(core.broker, claim.leases, recorded.requeue)
    return recorded.statuses


async def drain(core: Core, replace: Mapping[str, workflow_pb2.Workflow] | None = None,
                fail: frozenset[str] = frozenset()) -> None:
    for _ in range(20):
        if not await step(core, replace, fail=fail) and not (await core.broker.stats(QUEUE)).ready:
            return


async def replaced_by(core: Core, task_id: str) -> str:
    record = await core.store.get(task_id)
    assert record is not None and record.replaced_by, f"{task_id} was not replaced"
    return record.replaced_by


async def state(core: Core, task_id: str) -> str:
    """The task's state as people say it: "SUCCESS", "CANCELLED", ..."""
    return result_pb2.TaskState.Name((await record_of(core, task_id)).state).removeprefix("TASK_STATE_")


async def record_of(core: Core, task_id: str) -> result_pb2.TaskResult:
    record = await core.store.get(task_id)
    assert record is not None, f"{task_id} has no record"
    return record.result


# -- where the replaced task stands ----------------------------------------------------------


async def test_a_replaced_task_waits_for_its_replacement_and_takes_its_result(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    acks = await step(core, replace={"t": as_chain(task(task_id="r1"), task(task_id="r2"))})
    assert acks == {"t": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert await state(core, "t") in ("RECEIVED", "STARTED"), "replaced, it waits for its replacement"
    plan = await core.store.plan(await replaced_by(core, "t"))
    assert plan is not None and plan.replaces_task_id == "t"
    labels = {"name": "noop", "state": "replaced"}
    counted = core.metrics.registry.get_sample_value("conveyor_task_outcomes_total", labels)
    assert counted == 1, "the attempt is counted as replaced, not as started"
    await step(core)  # r1 -> 1
    assert await state(core, "t") != "SUCCESS"
    await step(core)  # r2 -> 2
    result = await record_of(core, "t")
    assert result.state == result_pb2.TASK_STATE_SUCCESS
    assert result.result.int_value == 2, "the task's result is its replacement's"


async def test_inspecting_a_replaced_task_shows_no_lease(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": as_task(task(task_id="r"))})
    inspected = await core.admin.inspector.inspect("t")
    assert inspected.result.state in (result_pb2.TASK_STATE_RECEIVED, result_pb2.TASK_STATE_STARTED)
    assert not inspected.lease_holder and not inspected.HasField("lease_expires_at")


async def test_replacement_tasks_without_ids_get_ids_derived_from_the_task(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": as_chain(task(), task())})
    plan = await core.store.plan(await replaced_by(core, "t"))
    assert plan is not None
    first = [node.task_id for node in plan.nodes if node.task_id]
    assert len(first) == 2 and all(first)
    record = await core.store.get("t")
    assert record is not None
    again = core.connections.recorder.followups.replacements._compile(
        record, as_chain(task(), task()), Checked(record.replaced_by, 1),
    )
    assert [n.task_id for n in again.plan.nodes if n.task_id] == first, "planning it again names the same tasks"
    await drain(core)
    assert (await record_of(core, "t")).result.int_value == 2


async def test_the_next_chain_step_gets_the_replacements_result(engines: Engines) -> None:
    core = engines.core
    await submit(core, chain(task(task_id="a"), task(task_id="b")))
    await step(core, replace={"a": as_task(task(task_id="r", args=[value(41)]))})
    await drain(core)
    b = await record_of(core, "b")
    assert b.signature.args[0].int_value == 42, "b got r's result (41 + 1) as its first arg"
    assert b.result.int_value == 43


async def test_a_chord_waits_for_a_replaced_member_and_gets_its_value(engines: Engines) -> None:
    core = engines.core
    await submit(core, chord([task(task_id="m0"), task(task_id="m1")], task(task_id="cb")))
    await step(core, replace={"m0": as_chain(task(task_id="r1", args=[value(9)]), task(task_id="r2"))})
    assert (await record_of(core, "cb")).state == result_pb2.TASK_STATE_PENDING, "the chord waits for m0's replacement"
    await drain(core, replace={})
    cb = await record_of(core, "cb")
    assert json.loads(cb.signature.args[0].json_value) == [11, 1], "m0 gives its replacement's value"


async def test_a_replaced_chord_callback_gives_the_chord_its_replacements_value(engines: Engines) -> None:
    core = engines.core
    await submit(core, chord([task(task_id="m0")], task(task_id="cb")))
    await step(core)
    await step(core, replace={"cb": as_task(task(task_id="r", args=[value(99)]))})
    assert await state(core, "cb") in ("RECEIVED", "STARTED")
    await drain(core)
    assert (await record_of(core, "cb")).result.int_value == 100


async def test_a_replaced_member_of_a_group_gives_a_nested_list_when_replaced_by_a_group(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    members = [as_task(task(task_id=f"g{i}", args=[value(i)])) for i in range(3)]
    await step(core, replace={"t": workflow_pb2.Workflow(group=workflow_pb2.Group(members=members))})
    await drain(core)
    assert json.loads((await record_of(core, "t")).result.json_value) == [1, 2, 3]


async def test_a_replacement_replaced_again_ends_both_tasks(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": as_task(task(task_id="u"))})
    await step(core, replace={"u": as_task(task(task_id="v", args=[value(6)]))})
    plan = await core.store.plan(await replaced_by(core, "u"))
    assert plan is not None and plan.replacement_depth == 2
    await drain(core)
    assert (await record_of(core, "u")).result.int_value == 7
    assert (await record_of(core, "t")).result.int_value == 7


async def test_a_replaced_task_that_ignores_its_result_ends_without_its_replacements_value(
    engines: Engines,
) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t", ignore_result=True)))
    await step(core, replace={"t": as_task(task(task_id="r", args=[value(1)]))})
    await drain(core)
    t = await record_of(core, "t")
    assert t.state == result_pb2.TASK_STATE_SUCCESS and not t.HasField("result")


# -- failures --------------------------------------------------------------------------------


async def test_a_cancelled_replacement_task_cancels_the_task_it_replaces(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": as_task(task(task_id="r"))})
    await core.canceller.cancel("r")
    t = await record_of(core, "t")
    assert t.state == result_pb2.TASK_STATE_CANCELLED and t.error.type == "Cancelled"



async def test_a_failed_replacement_fails_the_task_and_runs_its_error_callbacks(engines: Engines) -> None:
    core = engines.core
    await submit(core, chain(task(task_id="a", on_error=[task(task_id="a-err")]), task(task_id="b")))
    await step(core, replace={"a": as_task(task(task_id="r"))})
    await drain(core, fail=frozenset({"r"}))
    a = await record_of(core, "a")
    assert a.state == result_pb2.TASK_STATE_FAILURE
    assert (a.error.type, a.error.message) == ("Boom", "r"), "the replacement's error is the task's"
    assert await state(core, "b") == "CANCELLED", "the chain stops at the replaced step"
    errback = await record_of(core, "a-err")
    assert json.loads(errback.signature.args[0].json_value)["task_id"] == "a"


async def test_a_replacement_that_reuses_a_task_id_fails_the_task_with_invalid_replacement(
    engines: Engines,
) -> None:
    core = engines.core
    await submit(core, chain(task(task_id="a"), task(task_id="b")))
    acks = await step(core, replace={"a": as_task(task(task_id="b"))})
    assert acks == {"a": worker_service_pb2.ACK_STATUS_ACCEPTED}
    a = await record_of(core, "a")
    assert a.state == result_pb2.TASK_STATE_FAILURE
    assert a.error.type == "InvalidReplacement" and "b" in a.error.message and "already exist" in a.error.message
    record = await core.store.get("a")
    assert record is not None and not record.replaced_by, "nothing of it was planned"


async def test_a_replacement_deeper_than_the_limit_is_refused(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    deep = as_task(task(task_id="leaf"))
    for _ in range(40):
        deep = workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=[deep]))
    await step(core, replace={"t": deep})
    t = await record_of(core, "t")
    assert t.error.type == "InvalidReplacement" and "deeper than the limit of 32" in t.error.message


async def test_replacements_nested_past_the_depth_limit_are_refused(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t0")))
    for depth in range(32):
        await step(core, replace={f"t{depth}": as_task(task(task_id=f"t{depth + 1}"))})
    await step(core, replace={"t32": as_task(task(task_id="t33"))})
    t32 = await record_of(core, "t32")
    assert t32.error.type == "InvalidReplacement" and "replacements nest deeper" in t32.error.message
    await drain(core)
    assert await state(core, "t0") == "FAILURE", "the refusal reaches the first task"


# -- durability -----------------------------------------------------------------------------


async def test_a_replacement_reported_twice_is_started_once(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    deliveries = await core.broker.fetch(QUEUE, 10, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    [lease] = claim.leases
    report = worker_service_pb2.TaskOutcome(
        task_id="t",
        lease_token=lease.token,
        outcome=worker_service_pb2.OUTCOME_REPLACED,
        replacement=as_task(task(task_id="r")),
    )
    first = await core.connections.recorder.record([report], "w1", {"t": lease})
    second = await core.connections.recorder.record([report], "w1")
    assert first.statuses == {"t": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert second.statuses == {"t": worker_service_pb2.ACK_STATUS_ALREADY_DONE}
    assert engines.broker.published["r"] == 1


async def test_a_replacement_whose_start_failed_is_started_when_the_tasks_message_comes_back(
    engines: Engines,
) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    engines.broker.fail_publishes = 1  # the replacement's first task cannot be published
    acks = await step(core, replace={"t": as_task(task(task_id="r"))})
    assert acks == {"t": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert engines.broker.published["r"] == 0
    await drain(core)  # t's message came back: dispatch starts the replacement, then r runs
    assert engines.broker.published["r"] == 1
    assert (await record_of(core, "t")).result.int_value == 1


async def test_cancelling_a_replaced_task_cancels_its_replacement(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": as_chain(task(task_id="r1"), task(task_id="r2"))})
    cancelled = await core.canceller.cancel("t")
    assert {"t", "r1", "r2"} <= set(cancelled)
    assert await state(core, "r2") == "CANCELLED"


async def test_cancelling_a_replacement_ends_the_task_it_replaces(engines: Engines) -> None:
    core = engines.core
    await submit(core, chain(task(task_id="a"), task(task_id="b")))
    await step(core, replace={"a": as_task(task(task_id="r"))})
    await core.canceller.cancel(await replaced_by(core, "a"))
    assert await state(core, "a") == "CANCELLED"
    assert await state(core, "b") == "CANCELLED", "the chain stops there"


async def test_a_replacement_whose_end_was_cut_short_ends_its_task_once_on_repair(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t", on_success=[task(task_id="t-ok")])))
    await step(core, replace={"t": as_task(task(task_id="r"))})
    engines.broker.fail_publishes = 1  # t's callback cannot be published when r ends t
    acks = await step(core)
    assert acks == {"r": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert await state(core, "t") == "SUCCESS"
    assert engines.broker.published["t-ok"] == 0
    await drain(core)  # r's message came back: its follow-ups, t's end among them, run again
    assert engines.broker.published["t-ok"] == 1
    assert (await record_of(core, "t-ok")).signature.args[0].int_value == 1


# -- what a worker may ask for ---------------------------------------------------------------


async def test_a_worker_limited_to_some_queues_may_not_replace_a_task_with_tasks_for_others(
    engines: Engines,
) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")), lone(task(task_id="u")))
    deliveries = await core.broker.fetch(QUEUE, 10, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    tokens = {lease.task_id: lease.token for lease in claim.leases}
    elsewhere = task_pb2.Signature(name="noop", queue="billing")
    reports = [
        worker_service_pb2.TaskOutcome(
            task_id="t",
            lease_token=tokens["t"],
            outcome=worker_service_pb2.OUTCOME_REPLACED,
            replacement=as_task(elsewhere),
        ),
        worker_service_pb2.TaskOutcome(
            task_id="u",
            lease_token=tokens["u"],
            outcome=worker_service_pb2.OUTCOME_REPLACED,
            replacement=as_task(task()),
        ),
    ]
    receipts = {lease.task_id: lease for lease in claim.leases}
    await core.connections.recorder.record(reports, "w1", receipts, allowed_queues=(QUEUE,))
    t = await record_of(core, "t")
    assert t.error.type == "InvalidReplacement" and "['billing']" in t.error.message
    assert await state(core, "u") in ("RECEIVED", "STARTED"), "its own queue is allowed"
    assert await replaced_by(core, "u")


async def test_a_report_of_replaced_without_a_replacement_fails_the_task(engines: Engines) -> None:
    core = engines.core
    await submit(core, lone(task(task_id="t")))
    await step(core, replace={"t": workflow_pb2.Workflow()})
    t = await record_of(core, "t")
    assert t.error.type == "InvalidReplacement"
