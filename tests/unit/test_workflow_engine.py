"""The workflow engine on the memory engines: chains pass results on, groups count members
idempotently, a chord fires its callback once, failures travel through the canvas.

Two replicas share one broker and one backend (tests/unit/replicas.py) where a race matters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor.values import to_jsonable
from conveyor_server.core import confirmed
from conveyor_server.core.workflow import combine_members, outcome_of
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas, run_all, run_ready, short_lived
from tests.unit.test_durability import chord, submit, task

__all__ = ["quick_repairs", "replicas", "short_lived"]  # fixtures used by the tests below


def value(number: int) -> task_pb2.Value:
    return task_pb2.Value(int_value=number)


# -- a chord fires its callback once ----------------------------------------------------------


async def test_a_chord_whose_members_end_on_two_replicas_at_once_sends_its_callback_once(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, chord([task(task_id="m0"), task(task_id="m1")], task(task_id="cb")))
    claim = await lease_all(replicas.a)
    # Both adds are held until both members are in: each replica then sees the group complete.
    replicas.backend.meet_on_add("grp:", 2)
    first, second = await asyncio.gather(
        replicas.a.connections.recorder.record([outcome(claim, "m0", result=value(10))], "w1"),
        replicas.b.connections.recorder.record([outcome(claim, "m1", result=value(11))], "w1"),
    )
    assert first.statuses == {"m0": worker_service_pb2.ACK_STATUS_ACCEPTED} and second.statuses == {
        "m1": worker_service_pb2.ACK_STATUS_ACCEPTED
    }
    assert replicas.broker.published["cb"] == 1, "the callback is published once"
    assert replicas.backend.group_reads("grp:") == 1, "one replica claims the completion; the other stops there"
    record = await replicas.a.store.get("cb")
    assert record is not None and record.enqueued
    assert json.loads(record.result.signature.args[0].json_value) == [10, 11], "member results in member order"


async def test_a_member_reported_again_after_its_chord_completed_starts_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, chord([task(task_id="m0"), task(task_id="m1")], task(task_id="cb")))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record([outcome(claim, "m0"), outcome(claim, "m1")], "w1")
    assert replicas.broker.published["cb"] == 1
    reads = replicas.backend.group_reads("grp:")
    # The same member's follow-ups run again on the other replica (not a repair pass).
    ended = await replicas.b.store.get("m1")
    assert ended is not None
    await replicas.b.connections.dispatcher.followups.after_terminal([ended])
    assert replicas.broker.published["cb"] == 1
    assert replicas.backend.group_reads("grp:") == reads, "a completed group is not completed again"


async def test_the_engine_starts_a_workflow_step_once_however_often_it_is_asked(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chord([task(task_id="m0")], task(task_id="cb")))
    plan = await replicas.a.store.plan(response.workflow_id)
    assert plan is not None
    engine = replicas.b.connections.dispatcher.followups.workflow
    await asyncio.gather(engine.start_workflow(plan), engine.start_workflow(plan))
    assert replicas.broker.published["m0"] == 1, "the submit published m0; starting again sends nothing"


# -- chains, groups and chords run to the end ------------------------------------------------

WF = workflow_pb2


def step(task_id: str, **fields: object) -> WF.Workflow:
    return WF.Workflow(task=task(task_id=task_id, **fields))  # type: ignore[arg-type]


def flow(node: WF.Workflow) -> task_service_pb2.SubmitRequest:
    return task_service_pb2.SubmitRequest(workflow=node)


def chain_of(*steps: WF.Workflow, on_error: Sequence[task_pb2.Signature] = ()) -> WF.Workflow:
    return WF.Workflow(chain=WF.Chain(steps=steps, on_error=on_error))


def group_of(*members: WF.Workflow, on_error: Sequence[task_pb2.Signature] = ()) -> WF.Workflow:
    return WF.Workflow(group=WF.Group(members=members, on_error=on_error))


def chord_of(
    members: Sequence[WF.Workflow], callback: WF.Workflow,
    policy: WF.ChordFailurePolicy.ValueType = WF.CHORD_FAILURE_POLICY_UNSPECIFIED,
) -> WF.Workflow:
    return WF.Workflow(chord=WF.Chord(header=WF.Group(members=members), callback=callback, failure_policy=policy))


async def states(replicas: Replicas, *task_ids: str) -> dict[str, str]:
    loaded = await replicas.a.store.load(list(task_ids))
    return {t: result_pb2.TaskState.Name(loaded[t].record.result.state) for t in task_ids if t in loaded}


def args(assignment: worker_service_pb2.Assignment) -> list[object]:
    return [to_jsonable(a) for a in assignment.task.args]


async def test_a_chain_hands_each_result_to_the_next_step_unless_it_is_immutable(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, flow(chain_of(
        step("a", args=[value(1)]), step("b", args=[value(2)]), step("c", args=[value(3)], immutable=True),
        step("d"),
    )))
    ran = await run_all(replicas.a)
    assert {t: args(a) for t, a in ran.items()} == {"a": [1], "b": ["a", 2], "c": [3], "d": ["c"]}
    assert {a.attempt for a in ran.values()} == {1}
    assert {a.workflow_id for a in ran.values()} == {response.workflow_id}
    assert await states(replicas, "a", "b", "c", "d") == dict.fromkeys("abcd", "TASK_STATE_SUCCESS")
    assert dict(replicas.broker.published) == dict.fromkeys("abcd", 1)


async def test_a_failed_chain_step_cancels_the_rest_and_fires_the_chains_error_callbacks(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(
        step("a"), step("b"), group_of(step("c1"), step("c2")), step("d"), on_error=[task(name="alert")],
    )))
    ran = await run_all(replicas.a, fail={"b"})
    assert {"a", "b"} <= set(ran) and not {"c1", "c2", "d"} & set(ran)
    assert await states(replicas, "a", "b", "c1", "c2", "d") == {
        "a": "TASK_STATE_SUCCESS", "b": "TASK_STATE_FAILURE",
        "c1": "TASK_STATE_CANCELLED", "c2": "TASK_STATE_CANCELLED", "d": "TASK_STATE_CANCELLED",
    }
    cancelled = await replicas.a.store.get("d")
    assert cancelled is not None and cancelled.result.error.type == "Cancelled"
    assert "an earlier step of chain" in cancelled.result.error.message
    [alert] = [a for a in ran.values() if a.task.name == "alert"]
    assert alert.task.id.endswith(".err0")
    error = json.loads(alert.task.args[0].json_value)
    assert error["type"] == "Boom" and error["message"] == "b"


async def test_a_group_gives_its_member_results_in_member_order_to_the_next_step(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(group_of(step("g0"), step("g1"), step("g2")), step("after"))))
    first = await run_ready(replicas.a, results={"g0": value(0), "g1": value(1), "g2": value(2)})
    assert set(first) == {"g0", "g1", "g2"}
    second = await run_ready(replicas.a)
    assert args(second["after"]) == [[0, 1, 2]]


async def test_a_failed_group_member_fails_the_group_with_every_member_error(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(
        group_of(step("g0"), step("g1"), step("g2"), on_error=[task(name="group-alert")]), step("after"),
    )))
    ran = await run_all(replicas.a, fail={"g0", "g2"})
    assert "after" not in ran
    assert await states(replicas, "after") == {"after": "TASK_STATE_CANCELLED"}
    [alert] = [a for a in ran.values() if a.task.name == "group-alert"]
    error = json.loads(alert.task.args[0].json_value)
    assert error["type"] == "GroupMemberFailed"
    assert error["message"] == "member 0 (g0): Boom: g0; member 2 (g2): Boom: g2"


async def test_a_chord_whose_member_failed_fails_its_callback_by_default(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of(
        [step("m0"), step("m1")], step("cb", on_error=[task(name="cb-alert")]),
    )))
    ran = await run_all(replicas.a, fail={"m1"})
    assert "cb" not in ran
    record = await replicas.a.store.get("cb")
    assert record is not None and result_pb2.TaskState.Name(record.result.state) == "TASK_STATE_FAILURE"
    assert record.result.error.type == "ChordMemberFailed"
    assert record.result.error.message == "member 1 (m1): Boom: m1"
    [alert] = [a for a in ran.values() if a.task.name == "cb-alert"]
    assert json.loads(alert.task.args[0].json_value)["type"] == "ChordMemberFailed"


async def test_a_chord_that_continues_on_failure_runs_its_callback_with_partial_results(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of(
        [step("m0"), step("m1")], step("cb"), WF.CHORD_FAILURE_POLICY_CONTINUE,
    )))
    ran = await run_all(replicas.a, fail={"m0"})
    assert args(ran["cb"]) == [[{"error": {"type": "Boom", "message": "m0"}}, "m1"]]
    assert await states(replicas, "cb") == {"cb": "TASK_STATE_SUCCESS"}


async def test_a_chord_in_a_chain_passes_its_callbacks_result_on(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(chord_of([step("m0")], step("cb")), step("after"))))
    ran = await run_all(replicas.a)
    assert args(ran["cb"]) == [["m0"]]
    assert args(ran["after"]) == ["cb"]


async def test_an_empty_group_completes_at_once_with_an_empty_list(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), group_of(), step("b"))))
    ran = await run_all(replicas.a)
    assert args(ran["b"]) == [[]]


async def test_a_chord_over_an_empty_group_runs_its_callback_at_once(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([], step("cb"))))
    ran = await run_all(replicas.a)
    assert args(ran["cb"]) == [[]]


async def test_groups_nest_inside_groups(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([group_of(step("a"), step("b")), step("c")], step("cb"))))
    ran = await run_all(replicas.a)
    assert args(ran["cb"]) == [[["a", "b"], "c"]]


async def test_a_cancelled_step_ends_its_chain_like_a_failure(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), on_error=[task(name="alert")])))
    await replicas.a.canceller.cancel("a")
    ran = await run_all(replicas.a)
    assert await states(replicas, "a", "b") == {"a": "TASK_STATE_CANCELLED", "b": "TASK_STATE_CANCELLED"}
    [alert] = [a for a in ran.values() if a.task.name == "alert"]
    assert json.loads(alert.task.args[0].json_value)["type"] == "Cancelled"


async def test_a_whole_workflow_cancelled_runs_nothing_more(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, flow(chain_of(step("a"), step("b"))))
    assert sorted(await replicas.b.canceller.cancel(response.workflow_id)) == ["a", "b"]
    assert await run_all(replicas.a) == {}
    assert await states(replicas, "a", "b") == {"a": "TASK_STATE_CANCELLED", "b": "TASK_STATE_CANCELLED"}


def test_a_cancelled_record_without_an_error_still_reads_as_a_cancellation() -> None:
    record = records_pb2.TaskRecord()
    record.result.task_id, record.result.state = "t1", result_pb2.TASK_STATE_CANCELLED
    outcome_ = outcome_of(record)
    assert not outcome_.ok and outcome_.error.type == "Cancelled" and "t1" in outcome_.error.message
    record.result.error.type = "Purged"
    assert outcome_of(record).error.type == "Purged"


def test_combined_members_list_failures_by_index_and_task() -> None:
    ok = records_pb2.NodeOutcome(ok=True, value=value(1))
    failed = records_pb2.NodeOutcome(ok=False, error=result_pb2.TaskError(type="E", message="m"))
    combined = combine_members([ok, failed], ["t0", "t1"])
    assert not combined.ok and json.loads(combined.value.json_value) == [1, {"error": {"type": "E", "message": "m"}}]
    assert combined.error.type == "GroupMemberFailed" and combined.error.message == "member 1 (t1): E: m"
    assert combine_members([ok], ["t0"]).ok and not combine_members([ok], ["t0"]).HasField("error")


async def test_a_task_of_a_workflow_whose_plan_is_gone_is_left_alone(replicas: Replicas) -> None:
    record = records_pb2.TaskRecord(node_id="n1")
    record.result.workflow_id, record.result.task_id = "wf-gone", "t1"
    engine = replicas.a.connections.dispatcher.followups.workflow
    await engine.on_task_terminal(record)
    assert sum(replicas.broker.published.values()) == 0


async def test_a_finished_workflow_starts_the_ttl_of_its_records_plan_and_groups(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, flow(chord_of([step("m0")], step("cb"))))
    expired: list[tuple[list[str], list[str], list[str]]] = []
    real = replicas.backend.expire

    async def spy(records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        expired.append((list(records), list(groups), list(claims)))
        await real(records, groups, claims)

    replicas.backend.expire = spy  # type: ignore[method-assign]
    await run_all(replicas.a)
    wf = response.workflow_id
    assert expired, "the workflow's end starts its TTL"
    records, groups, claims = expired[-1]
    assert sorted(records) == sorted([f"plan:{wf}", "task:m0", "task:cb"])
    # The chord (n0) keeps nothing of its own: its header is a group node (n1) with its members and claim.
    assert groups == [f"grp:{wf}:n1"] and claims == [f"done:{wf}:n1"]


# -- failures that travel through nested nodes ------------------------------------------------


async def test_a_failed_chord_whose_callback_is_an_empty_group_fails_the_enclosing_chain(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(
        chord_of([step("m0")], group_of()), step("after"), on_error=[task(name="alert")],
    )))
    ran = await run_all(replicas.a, fail={"m0"})
    assert "after" not in ran
    assert await states(replicas, "after") == {"after": "TASK_STATE_CANCELLED"}
    [alert] = [a for a in ran.values() if a.task.name == "alert"]
    assert json.loads(alert.task.args[0].json_value)["type"] == "ChordMemberFailed"


async def test_a_failed_chord_callback_records_the_cause_in_its_history(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([step("m0")], chain_of(step("cb1"), step("cb2")))))
    await run_all(replicas.a, fail={"m0"})
    cb1 = await replicas.a.store.get("cb1")
    assert cb1 is not None and cb1.result.history[-1].error.type == "ChordMemberFailed"
    assert await states(replicas, "cb1", "cb2") == {"cb1": "TASK_STATE_FAILURE", "cb2": "TASK_STATE_CANCELLED"}
    cb2 = await replicas.a.store.get("cb2")
    assert cb2 is not None and cb2.result.history[-1].error.type == "Cancelled"


async def test_a_callback_cancelled_before_its_chord_failed_stays_cancelled(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([step("m0")], step("cb"))))
    await replicas.a.canceller.cancel("cb")
    await run_all(replicas.a, fail={"m0"})
    record = await replicas.a.store.get("cb")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
    assert record.result.error.message == "cancelled by request (cb)"


async def test_a_step_cancelled_before_its_chain_failed_keeps_its_own_cause(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), step("c"))))
    await replicas.a.canceller.cancel("c")
    await run_all(replicas.a, fail={"a"})
    loaded = await replicas.a.store.load(["b", "c"])
    assert "an earlier step of chain" in loaded["b"].record.result.error.message
    assert loaded["c"].record.result.error.message == "cancelled by request (c)"


async def test_the_error_callback_of_a_failed_chord_callback_is_resent_by_repair(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)
    await submit(replicas.a, flow(chord_of([step("m0")], step("cb", on_error=[task(name="alert")]))))
    replicas.broker.fail_publishes = 1  # the alert's publish, right after m0 fails the chord
    first = await run_ready(replicas.a, fail={"m0"})
    assert set(first) == {"m0"}
    assert sum(n for t, n in replicas.broker.published.items() if t.startswith("cb.err")) == 0
    await run_all(replicas.a)  # m0's message comes back: repair
    assert replicas.broker.published["cb.err0"] == 1
    assert await states(replicas, "cb", "cb.err0") == {"cb": "TASK_STATE_FAILURE", "cb.err0": "TASK_STATE_SUCCESS"}


async def test_groups_of_two_workflows_are_counted_apart(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([step("a0"), step("a1")], step("a-cb"))))
    await submit(replicas.a, flow(chord_of([step("b0"), step("b1")], step("b-cb"))))
    claim = await lease_all(replicas.a)
    recorder = replicas.a.connections.recorder
    await recorder.record([outcome(claim, "a0"), outcome(claim, "b0")], "w1")
    assert "a-cb" not in replicas.broker.published and "b-cb" not in replicas.broker.published
    await recorder.record([outcome(claim, "a1"), outcome(claim, "b1")], "w1")
    assert replicas.broker.published["a-cb"] == 1 and replicas.broker.published["b-cb"] == 1


async def test_a_chord_completes_on_an_engine_whose_unkept_keys_expire_at_once(short_lived: Replicas) -> None:
    await submit(short_lived.a, flow(chord_of([step("m0"), step("m1")], step("cb"))))
    claim = await lease_all(short_lived.a)
    recorder = short_lived.a.connections.recorder
    await recorder.record([outcome(claim, "m0")], "w1")
    await recorder.record([outcome(claim, "m1")], "w1")
    await recorder.record([outcome(claim, "m1")], "w1")  # a duplicate report finds the group done
    assert short_lived.broker.published["cb"] == 1
    assert short_lived.backend.group_reads("grp:") == 1


async def test_a_failed_member_inside_a_chain_is_named_by_the_chains_first_task(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of(
        [step("x"), chain_of(step("c1"), step("c2"))], step("cb"), WF.CHORD_FAILURE_POLICY_CONTINUE,
    )))
    await run_all(replicas.a, fail={"c2"})
    record = await replicas.a.store.get("cb")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_SUCCESS
    assert json.loads(record.result.signature.args[0].json_value)[1] == {"error": {"type": "Boom", "message": "c2"}}


async def test_a_failed_group_names_each_failed_member_by_its_first_task(replicas: Replicas) -> None:
    await submit(replicas.a, flow(group_of(
        step("x"), chain_of(step("c1"), step("c2")), on_error=[task(name="alert")],
    )))
    ran = await run_all(replicas.a, fail={"c2"})
    [alert] = [a for a in ran.values() if a.task.name == "alert"]
    assert json.loads(alert.task.args[0].json_value)["message"] == "member 1 (c1): Boom: c2"


async def test_link_callbacks_get_the_default_queue_the_trace_and_the_workflow(replicas: Replicas) -> None:
    signature = task(task_id="a", on_success=[task_pb2.Signature(name="cb")], headers={"traceparent": "tp"})
    [response] = await submit(replicas.a, flow(chain_of(WF.Workflow(task=signature), step("b"))))
    await run_ready(replicas.a)
    record = await replicas.a.store.get("a.ok0")
    assert record is not None
    assert record.result.queue == "default" and record.result.signature.headers["traceparent"] == "tp"
    assert record.result.workflow_id == response.workflow_id
    assert [a.string_value for a in record.result.signature.args] == ["a"]
