"""Submitting (checks, limits, ids, trace headers, delays), cancelling (queued, running, whole
workflows, unknown ids), the reconciler's promises, and the small pure helpers they use."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.config import Limits
from conveyor_server.core.errors import AlreadyExists, InvalidArgument, NotFound
from conveyor_server.core.outbox import FOLLOW_UPS, OUTBOX_GROUP, PUBLISH
from conveyor_server.core.publisher import Publication, decode_message, encode_message, scheduled_delay
from conveyor_server.core.signatures import error_value, filled
from conveyor_server.core.validation import check_signature, check_workflow
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas, run_ready, sent
from tests.unit.test_durability import GRACE, QUEUE, chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
WF = workflow_pb2


# -- submitting ---------------------------------------------------------------------------------


async def test_an_empty_batch_and_a_request_without_a_target_are_refused(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match="the batch is empty"):
        await replicas.a.submitter.submit([])
    with pytest.raises(InvalidArgument, match=r"^request: set task or workflow"):
        await submit(replicas.a, task_service_pb2.SubmitRequest())
    with pytest.raises(InvalidArgument, match=r"^requests\[1\]: set task or workflow"):
        await submit(replicas.a, lone(task()), task_service_pb2.SubmitRequest())


async def test_a_submission_over_the_task_limit_is_refused_whole(replicas: Replicas) -> None:
    replicas.a.submitter.settings = replicas.a.settings.replace(limits=Limits(max_workflow_tasks=2))
    with pytest.raises(InvalidArgument, match="holds 3 tasks, over the limit of 2"):
        await submit(replicas.a, lone(task()), chain(task(), task()))
    assert not [k for k in replicas.backend._records if k.startswith("task:")]
    await submit(replicas.a, lone(task()), lone(task()))


async def test_task_ids_must_be_unique_within_and_across_submissions(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match="same task id more than once"):
        await submit(replicas.a, lone(task(task_id="x")), lone(task(task_id="x")))
    await submit(replicas.a, lone(task(task_id="x")))
    with pytest.raises(AlreadyExists, match="task ids already exist: x"):
        await submit(replicas.b, chain(task(task_id="y"), task(task_id="x")))
    refused = await replicas.a.store.get("y")
    assert refused is None or refused.result.state == result_pb2.TASK_STATE_CANCELLED, "nothing of a refused batch runs"
    assert (await replicas.a.broker.stats("default")).ready == 1, "only the first x was published"


async def test_a_lone_task_gets_an_id_the_default_queue_and_the_callers_trace(replicas: Replicas) -> None:
    submitted: list[str] = []
    replicas.a.submitter.on_submitted = lambda records: submitted.extend(r.result.task_id for r in records)
    signature = task_pb2.Signature(name="noop", headers={"traceparent": "mine"})
    [response] = await replicas.a.submitter.submit(
        [task_service_pb2.SubmitRequest(task=signature)], {"traceparent": "caller", "tracestate": "s", "other": "o"},
    )
    assert list(response.task_ids) == [response.task_id] and not response.workflow_id
    record = await replicas.a.store.get(response.task_id)
    assert record is not None and record.result.queue == "default"
    assert dict(record.result.signature.headers) == {"traceparent": "mine", "tracestate": "s"}
    assert submitted == [response.task_id]
    assert replicas.broker.published[response.task_id] == 1


async def test_a_workflow_of_one_task_is_submitted_as_that_task(replicas: Replicas) -> None:
    request = task_service_pb2.SubmitRequest(workflow=WF.Workflow(task=task(task_id="t1")))
    [response] = await submit(replicas.a, request)
    assert response.task_id == "t1" and not response.workflow_id
    record = await replicas.a.store.get("t1")
    assert record is not None and not record.node_id and record.enqueued


async def test_a_workflow_answers_with_its_id_its_tasks_and_its_result_task(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    assert response.workflow_id.startswith("wf-") and list(response.task_ids) == ["a", "b"]
    assert response.task_id == "b"
    b = await replicas.a.store.get("b")
    assert b is not None and not b.enqueued and b.node_id and b.result.workflow_id == response.workflow_id
    assert dict(replicas.broker.published) == {"a": 1}


async def test_a_delayed_task_waits_in_the_broker(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", countdown=Duration(seconds=60))))
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed) == (0, 1)


def test_the_delay_comes_from_the_countdown_or_the_eta() -> None:
    assert scheduled_delay(task_pb2.Signature(), now=990.0) == 0.0
    assert scheduled_delay(task_pb2.Signature(countdown=Duration(seconds=5, nanos=500_000_000)), now=990.0) == 5.5
    assert scheduled_delay(task_pb2.Signature(countdown=Duration(seconds=-5)), now=990.0) == 0.0
    eta = task_pb2.Signature(eta=Timestamp(seconds=1000, nanos=250_000_000))
    assert scheduled_delay(eta, now=990.0) == 10.25
    assert scheduled_delay(eta, now=2000.0) == 0.0
    assert 0 < scheduled_delay(task_pb2.Signature(eta=Timestamp(seconds=int(time.time()) + 100)), time.time()) <= 100


def test_a_message_carries_the_signature_attempt_and_workflow() -> None:
    signature = task_pb2.Signature(id="t1", name="n")
    message = decode_message(encode_message(Publication(signature, 3, "wf-1")))
    assert (message.signature, message.attempt, message.workflow_id) == (signature, 3, "wf-1")


# -- cancelling ---------------------------------------------------------------------------------


async def test_cancelling_an_unknown_id_is_not_found(replicas: Replicas) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        await replicas.a.canceller.cancel("nope")
    with pytest.raises(NotFound):
        await replicas.a.canceller.cancel("wf-nope")


async def test_a_queued_task_cancelled_is_stored_cancelled_and_never_runs(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    assert await replicas.b.canceller.cancel("t1") == ["t1"]
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
    assert record.result.error.type == "Cancelled" and record.result.error.message == "cancelled by request (t1)"
    assert record.result.error.traceback == "" and record.result.history[-1].error.type == "Cancelled"
    assert await run_ready(replicas.a) == {}
    assert await replicas.a.canceller.cancel("t1") == [], "an ended task is left alone"
    await replicas.a.outbox.drain()
    await replicas.b.outbox.drain()  # the cancel's promise was b's
    assert not await replicas.backend.members(OUTBOX_GROUP)


async def test_a_running_task_cancelled_gets_a_cancel_on_its_workers_stream(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), lone(task(task_id="t2")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    claim = await lease_all(replicas.a)
    await session.settle(0, claim.leases)
    sent(session)
    await replicas.a.canceller.cancel("t1")
    assert [m.cancel.task_ids for m in sent(session)] == [["t1"]]


async def test_a_whole_workflow_is_cancelled_by_its_id(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    await run_ready(replicas.a)
    assert await replicas.b.canceller.cancel(response.workflow_id) == ["b"]
    record = await replicas.a.store.get("b")
    assert record is not None and record.result.error.message == f"cancelled by request ({response.workflow_id})"


# -- the reconciler ---------------------------------------------------------------------------------


async def test_an_overdue_follow_up_promise_is_kept_by_one_replica(replicas: Replicas) -> None:
    await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    await run_ready(replicas.a)  # a succeeds; b is published
    claim = await lease_all(replicas.a)
    # b ended, but its follow-ups (none needed here, its workflow's end) were only promised.
    recorded = await replicas.a.connections.recorder.record(
        [
            worker_service_pb2.TaskOutcome(
                task_id="b", lease_token=claim.leases[0].token, outcome=worker_service_pb2.OUTCOME_SUCCESS
            )
        ],
        "w1",
    )
    assert recorded.statuses == {"b": worker_service_pb2.ACK_STATUS_ACCEPTED}
    await replicas.a.outbox.drain()  # the submit's confirmed promises are gone before the clock jumps
    await replicas.a.outbox.promise(FOLLOW_UPS, ["b", "gone"], entry_id="ob-test")
    assert await replicas.a.reconciler.reconcile_once() == 0, "not overdue yet"
    replicas.clock.now += GRACE + 1
    replicas.b.reconciler.clock = replicas.clock
    assert await replicas.a.reconciler.reconcile_once() == 1
    assert await replicas.b.reconciler.reconcile_once() == 0, "kept already"
    assert "ob-test" not in await replicas.backend.members(OUTBOX_GROUP)


async def test_replicas_reconciling_at_once_keep_a_promise_once(replicas: Replicas) -> None:
    await replicas.a.outbox.promise(FOLLOW_UPS, [], entry_id="ob-test")
    replicas.clock.now += GRACE + 1
    done = await asyncio.gather(replicas.a.reconciler.reconcile_once(), replicas.b.reconciler.reconcile_once())
    assert sorted(done) == [0, 1]
    assert "ob-test" not in await replicas.backend.members(OUTBOX_GROUP)


async def test_a_promise_whose_work_fails_stays_for_a_later_pass(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", on_success=[task("cb")])))
    await run_ready(replicas.a)
    await replicas.a.outbox.drain()  # the submit's confirmed promise is gone before the clock jumps
    await replicas.a.outbox.promise(FOLLOW_UPS, ["t1"], entry_id="ob-test")
    replicas.clock.now += GRACE + 1
    replicas.backend.fail_reads = 1
    assert await replicas.a.reconciler.reconcile_once() == 0
    assert "ob-test" in await replicas.backend.members(OUTBOX_GROUP)
    replicas.clock.now += GRACE + 1
    assert await replicas.b.reconciler.reconcile_once() == 1
    assert replicas.broker.published["t1.ok0"] == 1, "the callback sent once, by the first run"


# -- helpers ------------------------------------------------------------------------------------


def test_a_filled_signature_keeps_what_it_has_and_gets_what_it_lacks() -> None:
    mine = filled(task_pb2.Signature(id="x", queue="q", headers={"traceparent": "p"}), "default", task_id="y",
                  inherit_headers={"traceparent": "caller", "tracestate": "s", "baggage": "b"})
    assert (mine.id, mine.queue, dict(mine.headers)) == ("x", "q", {"traceparent": "p", "tracestate": "s"})
    derived = filled(task_pb2.Signature(), "default", task_id="y")
    assert (derived.id, derived.queue, dict(derived.headers)) == ("y", "default", {})
    fresh = filled(task_pb2.Signature(), "default")
    assert len(fresh.id) == 36 and fresh.id != filled(task_pb2.Signature(), "default").id


def test_an_error_reaches_an_on_error_callback_as_one_json_object() -> None:
    error = result_pb2.TaskError(type="Boom", message="m", traceback="tb")
    assert json.loads(error_value(error, "t1").json_value) == {
        "task_id": "t1", "type": "Boom", "message": "m", "traceback": "tb",
    }


@pytest.mark.parametrize(("signature", "message"), [
    (task_pb2.Signature(), "task: name is empty"),
    (task_pb2.Signature(name="a b"), "whitespace or control characters"),
    (task_pb2.Signature(name="n", id="bad id"), "must be 1-128 of"),
    (task_pb2.Signature(name="n", queue="bad queue"), "must be 1-64 of"),
    (task_pb2.Signature(name="n", priority=10), "priority 10 is outside 0..9"),
    (task_pb2.Signature(name="n", priority=-1), "priority -1 is outside 0..9"),
    (task_pb2.Signature(name="n", args=[task_pb2.Value(string_value="x" * 200)]), "over the limit of 100"),
    (task_pb2.Signature(name="n", kwargs={"k": task_pb2.Value(string_value="x" * 200)}), "over the limit of 100"),
    (task_pb2.Signature(name="n", eta=Timestamp(seconds=5), countdown=Duration(seconds=1)), "not both"),
    (task_pb2.Signature(name="n", eta=Timestamp(seconds=-1)), "is not a valid time"),
    (task_pb2.Signature(name="n", eta=Timestamp(seconds=0)), "is not a valid time"),
    (task_pb2.Signature(name="n", eta=Timestamp(seconds=4_000_000_000)), "more than a year ahead"),
    (task_pb2.Signature(name="n", countdown=Duration(seconds=-1)), "countdown is negative"),
    (task_pb2.Signature(name="n", countdown=Duration(seconds=400 * 86_400)), "countdown is more than a year"),
    (task_pb2.Signature(name="n", retry=task_pb2.RetryPolicy(max_attempts=-1)), "max_attempts is negative"),
    (task_pb2.Signature(name="n", retry=task_pb2.RetryPolicy(jitter=1.5)), "jitter 1.5 is outside 0..1"),
    (task_pb2.Signature(name="n", retry=task_pb2.RetryPolicy(jitter=-0.1)), "is outside 0..1"),
    (task_pb2.Signature(name="n", retry=task_pb2.RetryPolicy(initial=Duration(seconds=-1))), "retry.initial is neg"),
    (task_pb2.Signature(name="n", retry=task_pb2.RetryPolicy(max=Duration(seconds=-1))), "retry.max is negative"),
    (task_pb2.Signature(name="n", time_limit=Duration(seconds=-1)), "time_limit is negative"),
    (task_pb2.Signature(name="n", routing_timeout=Duration(seconds=-1)), "routing_timeout is negative"),
    (task_pb2.Signature(name="n", on_success=[task_pb2.Signature()]), r"task.on_success\[0\]: name is empty"),
    (task_pb2.Signature(name="n", on_error=[task_pb2.Signature(name="x y")]), r"task.on_error\[0\]: name"),
])
def test_a_bad_signature_is_refused_with_what_is_wrong(signature: task_pb2.Signature, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_signature(signature, Limits(max_args_bytes=100))


def test_signatures_at_the_limits_are_fine() -> None:
    limits = Limits(max_args_bytes=100)
    check_signature(task_pb2.Signature(name="n", id="a" * 128, queue="q" * 64, priority=9), limits)
    check_signature(task_pb2.Signature(name="n", priority=0, retry=task_pb2.RetryPolicy(jitter=1.0)), limits)
    check_signature(task_pb2.Signature(name="n", countdown=Duration(seconds=0), time_limit=Duration()), limits)
    check_signature(task_pb2.Signature(name="n", routing_timeout=Duration()), limits)  # 0: fail at once
    check_signature(task_pb2.Signature(name="n", eta=Timestamp(seconds=int(time.time()) + 86_400)), limits)


def test_a_record_of_a_new_task_is_pending_with_its_history() -> None:
    record = records_pb2.TaskRecord()
    assert not record.enqueued


async def test_a_publish_promise_republishes_only_its_own_tasks_still_pending(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="ran")), lone(task(task_id="queued")))
    await replicas.a.outbox.drain()
    ran = await run_ready(replicas.a, results={})
    assert set(ran) == {"ran", "queued"}
    await submit(replicas.a, lone(task(task_id="mine")))
    await replicas.a.outbox.drain()
    mine = await replicas.a.store.get("mine")
    assert mine is not None
    # A promise covering all three, as the one "mine" was written under.
    await replicas.a.outbox.promise(PUBLISH, ["ran", "queued", "mine"], entry_id=mine.outbox_id)
    replicas.clock.now += GRACE + 1
    assert await replicas.a.reconciler.reconcile_once() == 1
    assert dict(replicas.broker.published) == {"ran": 1, "queued": 1, "mine": 2}


async def test_an_outbox_entry_is_overdue_from_exactly_its_grace(replicas: Replicas) -> None:
    entry_id = await replicas.a.outbox.promise(FOLLOW_UPS, ["t1"])
    [(found_id, entry)] = await replicas.a.outbox.entries(0.0, time.time() + 1)
    assert found_id == entry_id and list(entry.task_ids) == ["t1"] and entry.kind == FOLLOW_UPS
    created = entry.created_at.seconds + entry.created_at.nanos / 1e9
    assert [e for e, _ in await replicas.a.outbox.entries(5.0, created + 5.0)] == [entry_id]
    assert await replicas.a.outbox.entries(5.0, created + 4.9) == []


def node(**kind: object) -> WF.Workflow:
    return WF.Workflow(**kind)  # type: ignore[arg-type]


def leaf(name: str = "t", **fields: object) -> WF.Workflow:
    return WF.Workflow(task=task_pb2.Signature(name=name, **fields))  # type: ignore[arg-type]


def test_a_workflow_counts_its_tasks_and_their_link_callbacks() -> None:
    limits = Limits()
    with_links = leaf(on_success=[task_pb2.Signature(name="s1"), task_pb2.Signature(name="s2")],
                      on_error=[task_pb2.Signature(name="e")])
    assert check_workflow(with_links, limits) == 4
    assert check_workflow(node(chain=WF.Chain(steps=[leaf(), leaf()])), limits) == 2
    assert check_workflow(node(group=WF.Group(members=[leaf(), leaf(), leaf()])), limits) == 3
    chord = node(chord=WF.Chord(header=WF.Group(members=[leaf(), leaf()]), callback=leaf()))
    assert check_workflow(chord, limits) == 3
    assert check_workflow(chord, Limits(max_workflow_tasks=3)) == 3
    with pytest.raises(InvalidArgument, match="workflow has 3 tasks, over the limit of 2"):
        check_workflow(chord, Limits(max_workflow_tasks=2))


def test_workflow_depth_counts_each_level_and_a_chords_header_as_two() -> None:
    chain = node(chain=WF.Chain(steps=[leaf()]))
    assert check_workflow(chain, Limits(max_workflow_depth=2)) == 1
    with pytest.raises(InvalidArgument, match=r"workflow.chain\[0\]: workflow nests deeper than the limit of 1"):
        check_workflow(chain, Limits(max_workflow_depth=1))
    group = node(group=WF.Group(members=[node(chain=WF.Chain(steps=[leaf()]))]))
    assert check_workflow(group, Limits(max_workflow_depth=3)) == 1
    with pytest.raises(InvalidArgument, match=r"workflow.group\[0\].chain\[0\]: workflow nests deeper"):
        check_workflow(group, Limits(max_workflow_depth=2))
    chord = node(chord=WF.Chord(header=WF.Group(members=[leaf()]), callback=node(chain=WF.Chain(steps=[leaf()]))))
    assert check_workflow(chord, Limits(max_workflow_depth=3)) == 2
    with pytest.raises(InvalidArgument, match=r"workflow.chord.header\[0\]: workflow nests deeper"):
        check_workflow(chord, Limits(max_workflow_depth=2))
    deep_callback = node(chord=WF.Chord(header=WF.Group(), callback=node(chain=WF.Chain(steps=[leaf()]))))
    with pytest.raises(InvalidArgument, match=r"workflow.chord.callback.chain\[0\]: workflow nests deeper"):
        check_workflow(deep_callback, Limits(max_workflow_depth=2))


@pytest.mark.parametrize(("workflow", "message"), [
    (WF.Workflow(), "^workflow: empty workflow node; set task, chain, group, chord or map$"),
    (node(chord=WF.Chord(header=WF.Group(members=[leaf()]))), "^workflow: a chord needs a callback$"),
    (node(group=WF.Group(members=[leaf(), leaf("")])), r"^workflow.group\[1\]: name is empty"),
    (node(chord=WF.Chord(header=WF.Group(members=[leaf("")]), callback=leaf())), r"^workflow.chord.header\[0\]: "),
    (node(chord=WF.Chord(header=WF.Group(), callback=leaf(""))), r"^workflow.chord.callback: name is empty"),
    (node(chain=WF.Chain(steps=[leaf()], on_error=[task_pb2.Signature()])), r"^workflow.chain.on_error\[0\]: "),
])
def test_a_bad_workflow_is_refused_with_where_it_is_wrong(workflow: WF.Workflow, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_workflow(workflow, Limits())
