"""The workflow engine: the edges mutation testing found unpinned (values into nested nodes,
failures that stop where they should, records that already ended left alone, repair passes
through every kind of node, an engine whose follow-up hooks do nothing).

Two replicas over shared memory engines (tests/unit/replicas.py); a repair is provoked as in
production: a follow-up's publish fails, the finished task's message comes back, and its
follow-ups run again with `repair=True`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence

import pytest
from opentelemetry import trace

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, worker_service_pb2
from conveyor_server.core import confirmed
from conveyor_server.core.canvas import Drive, nodes_by_id
from conveyor_server.core.records import error, transition
from conveyor_server.core.workflow import WorkflowEngine, combine_members
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas, run_all, run_ready, short_lived
from tests.unit.test_durability import Outage, submit, task
from tests.unit.test_workflow_engine import WF, args, chain_of, chord_of, flow, group_of, states, step, value

__all__ = ["quick_repairs", "replicas", "short_lived"]  # fixtures used by the tests below


async def version(replicas: Replicas, task_id: str) -> int:
    return (await replicas.a.store.load([task_id]))[task_id].version


def alert_error(ran: dict[str, worker_service_pb2.Assignment], name: str = "alert") -> dict[str, str]:
    [alert] = [a for a in ran.values() if a.task.name == name]
    return json.loads(alert.task.args[0].json_value)  # type: ignore[no-any-return]


# -- results flow into nested nodes ---------------------------------------------------------------

async def test_a_result_reaches_the_first_step_of_a_nested_chain_and_every_member_of_a_group(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), chain_of(step("b"), step("c")), group_of(step("d"), step("e")))))
    ran = await run_all(replicas.a)
    assert args(ran["b"]) == ["a"]
    assert args(ran["c"]) == ["b"]
    assert args(ran["d"]) == ["c"] and args(ran["e"]) == ["c"]


async def test_a_nested_chain_hands_its_last_result_to_the_enclosing_chord(replicas: Replicas) -> None:
    nested = chain_of(step("c1"), step("c2"))
    await submit(replicas.a, flow(chord_of([step("x"), nested], chain_of(step("cb1"), step("cb2")))))
    ran = await run_all(replicas.a)
    assert args(ran["cb1"]) == [["x", "c2"]]
    assert args(ran["cb2"]) == ["cb1"]


async def test_an_empty_group_inside_a_group_gives_an_empty_list(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(group_of(group_of(), step("b")), step("after"))))
    ran = await run_all(replicas.a)
    assert args(ran["after"]) == [[[], "b"]]


# -- failures stop where they should ----------------------------------------------------------------

async def test_a_failed_first_step_cancels_every_later_step(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), step("c"))))
    await run_all(replicas.a, fail={"a"})
    assert await states(replicas, "a", "b", "c") == {
        "a": "TASK_STATE_FAILURE", "b": "TASK_STATE_CANCELLED", "c": "TASK_STATE_CANCELLED",
    }


async def test_a_failed_chain_inside_a_continuing_chord_cancels_only_its_own_steps(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of(
        [chain_of(step("a"), step("b")), step("x")], step("cb"), WF.CHORD_FAILURE_POLICY_CONTINUE,
    )))
    ran = await run_all(replicas.a, fail={"a"})
    assert await states(replicas, "b", "cb") == {"b": "TASK_STATE_CANCELLED", "cb": "TASK_STATE_SUCCESS"}
    assert args(ran["cb"]) == [[{"error": {"type": "Boom", "message": "a"}}, "x"]]


async def test_a_failed_group_names_a_member_that_is_an_empty_group_by_no_task(replicas: Replicas) -> None:
    # The chord's member fails, so its callback (a group holding an empty group) fails whole.
    await submit(replicas.a, flow(chord_of(
        [step("m0")], group_of(group_of(), step("x"), on_error=[task(name="alert")]),
    )))
    ran = await run_all(replicas.a, fail={"m0"})
    cause = "ChordMemberFailed: member 0 (m0): Boom: m0"
    assert alert_error(ran)["message"] == f"member 0 (): {cause}; member 1 (x): {cause}"


async def test_a_step_cancelled_before_its_turn_is_not_started_when_the_step_before_succeeds(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), step("b"))))
    await replicas.a.canceller.cancel("b")
    ran = await run_all(replicas.a)
    assert set(ran) == {"a"}
    assert replicas.broker.published["b"] == 0
    assert await states(replicas, "b") == {"b": "TASK_STATE_CANCELLED"}


async def test_records_that_already_ended_are_not_written_again_when_their_node_is_ended(replicas: Replicas) -> None:
    # A chain's failure cancels the rest, a chord member's failure fails the callback: steps
    # cancelled earlier keep their record as it was (the mutation says it changed nothing).
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), step("c"))))
    await submit(replicas.a, flow(chord_of([step("m0")], step("cb"))))
    await replicas.a.canceller.cancel("c")
    await replicas.a.canceller.cancel("cb")
    before = {t: await version(replicas, t) for t in ("c", "cb")}
    await run_all(replicas.a, fail={"a", "m0"})
    assert await states(replicas, "b") == {"b": "TASK_STATE_CANCELLED"}
    assert {t: await version(replicas, t) for t in ("c", "cb")} == before


# -- repair passes through every kind of node ------------------------------------------------------

@pytest.fixture
def claims_taken_over_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)


async def repaired(
    replicas: Replicas, first: set[str], fail: Collection[str] = ()
) -> dict[str, worker_service_pb2.Assignment]:
    """Run what is ready with the first follow-up publish failing, then everything (the
    repair of the task whose follow-up was lost included); returns what ran after."""
    replicas.broker.fail_publishes = 1
    assert set(await run_ready(replicas.a, fail=fail)) == first
    assert replicas.broker.fail_publishes == 0, "a follow-up publish failed"
    return await run_all(replicas.a, fail=fail)


@pytest.mark.usefixtures("claims_taken_over_at_once")
async def test_repair_starts_the_step_after_a_nested_chain(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(chain_of(step("a"), step("b")), step("c"))))
    await run_ready(replicas.a)
    ran = await repaired(replicas, {"b"})
    assert set(ran) == {"c"} and replicas.broker.published["c"] == 1


@pytest.mark.usefixtures("claims_taken_over_at_once")
async def test_repair_starts_the_step_after_a_chord(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(chord_of([step("m0")], step("cb")), step("after"))))
    await run_ready(replicas.a)
    ran = await repaired(replicas, {"cb"})
    assert set(ran) == {"after"} and replicas.broker.published["after"] == 1


@pytest.mark.usefixtures("claims_taken_over_at_once")
async def test_repair_starts_the_step_after_an_empty_group(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), group_of(), step("b"))))
    ran = await repaired(replicas, {"a"})
    assert set(ran) == {"b"} and args(ran["b"]) == [[]]


@pytest.mark.parametrize(
    ("workflow", "fail"),
    [
        # a chain's own step failed
        (chain_of(step("a"), step("b"), on_error=[task(name="alert")]), {"a"}),
        # a nested chain failed, and with it the enclosing chain
        (chain_of(chain_of(step("a"), step("b")), step("c"), on_error=[task(name="alert")]), {"a"}),
        # a group member failed
        (group_of(step("a"), step("b"), on_error=[task(name="alert")]), {"a"}),
        # a chord failed through its callback, an empty group, and the enclosing chain with it
        (chain_of(chord_of([step("a")], group_of()), step("after"), on_error=[task(name="alert")]), {"a"}),
    ],
    ids=["chain-step", "nested-chain", "group-member", "chord-with-empty-callback"],
)
@pytest.mark.usefixtures("claims_taken_over_at_once")
async def test_repair_sends_the_error_callback_whose_first_publish_failed(
    replicas: Replicas, workflow: WF.Workflow, fail: set[str]
) -> None:
    await submit(replicas.a, flow(workflow))
    first = {"a", "b"} if workflow.WhichOneof("kind") == "group" else {"a"}
    ran = await repaired(replicas, first, fail)
    assert {a.task.name for a in ran.values()} == {"alert"}
    assert sum(n for t, n in replicas.broker.published.items() if ".err" in t) == 1


# -- group completion is claimed once --------------------------------------------------------------

async def test_a_group_completed_on_an_engine_whose_unkept_keys_expire_at_once_is_not_completed_again(
    short_lived: Replicas,
) -> None:
    await submit(short_lived.a, flow(chord_of([step("m0"), step("m1")], step("cb"))))
    claim = await lease_all(short_lived.a)
    await short_lived.a.connections.recorder.record([outcome(claim, "m0"), outcome(claim, "m1")], "w1")
    reads = short_lived.backend.group_reads("grp:")
    ended = await short_lived.b.store.get("m1")
    assert ended is not None
    await short_lived.b.connections.dispatcher.followups.after_terminal([ended])  # reported again
    assert short_lived.backend.group_reads("grp:") == reads
    assert short_lived.broker.published["cb"] == 1


async def test_the_members_of_two_workflows_groups_do_not_mix(replicas: Replicas) -> None:
    await submit(replicas.a, flow(chord_of([step("a0"), step("a1")], step("a-cb"))))
    await submit(replicas.a, flow(chord_of([step("b0"), step("b1")], step("b-cb"))))
    claim = await lease_all(replicas.a)
    recorder = replicas.a.connections.recorder
    await recorder.record([outcome(claim, "a0", result=value(0)), outcome(claim, "b0", result=value(10))], "w1")
    await recorder.record([outcome(claim, "a1", result=value(1)), outcome(claim, "b1", result=value(11))], "w1")
    ran = await run_ready(replicas.a)
    assert args(ran["a-cb"]) == [[0, 1]] and args(ran["b-cb"]) == [[10, 11]]


# -- the engine on its own ---------------------------------------------------------------------------

def test_a_groups_outcome_keeps_each_members_outcome_in_member_order() -> None:
    ok = records_pb2.NodeOutcome(ok=True, value=value(1))
    failed = records_pb2.NodeOutcome(ok=False, error=result_pb2.TaskError(type="E", message="m"))
    assert list(combine_members([failed, ok], ["t0", "t1"]).members) == [failed, ok]


class NoFollowUps:
    """Follow-up hooks that do nothing: what is left is what the engine does by itself."""

    async def after_terminal(self, records: Sequence[records_pb2.TaskRecord], repair: bool = False) -> None:
        return None

    async def fire_callbacks(self, *args: object, **kwargs: object) -> None:
        return None

    async def replacement_done(
        self, plan: records_pb2.WorkflowPlan, outcome: records_pb2.NodeOutcome, repair: bool,
    ) -> None:
        return None


async def test_an_engine_whose_follow_ups_do_nothing_ends_failed_nodes_without_firing_anything(
    replicas: Replicas,
) -> None:
    [chain_flow] = await submit(replicas.a, flow(chain_of(step("a"), step("b"), on_error=[task(name="alert")])))
    await submit(replicas.a, flow(chord_of([step("m0")], step("cb"))))
    followups = replicas.a.connections.dispatcher.followups
    engine = WorkflowEngine(followups.store, followups.publisher, followups=NoFollowUps())
    cause = error("Boom", "failed")

    def fail(_: str, record: records_pb2.TaskRecord) -> bool:
        transition(record, result_pb2.TASK_STATE_FAILURE, error=cause)
        return True

    for task_id in ("a", "m0"):
        [record] = (await replicas.a.store.update([task_id], fail)).values()
        await engine.on_task_terminal(record)
    assert await states(replicas, "b", "cb") == {"b": "TASK_STATE_CANCELLED", "cb": "TASK_STATE_FAILURE"}
    assert not [t for t in replicas.broker.published if t.startswith(chain_flow.workflow_id)], "no error callback"


async def test_a_repair_that_starts_a_step_itself_publishes_it_at_once(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first pass fails before starting "b" (its success callback cannot be stored); the
    # repair claims "b" itself, so no other claimer can be publishing it: it goes out now,
    # without waiting for the claim grace a claim of an earlier pass gets.
    await submit(replicas.a, flow(chain_of(step("a", on_success=[task(name="cb")]), step("b"))))
    real_insert = replicas.backend.insert

    async def callback_insert_fails_once(records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        if any(key.startswith("task:a.ok") for key in records):
            monkeypatch.setattr(replicas.backend, "insert", real_insert)
            raise Outage("backend unreachable (injected)")
        return await real_insert(records, keep)

    monkeypatch.setattr(replicas.backend, "insert", callback_insert_fails_once)
    assert set(await run_ready(replicas.a)) == {"a"}
    assert replicas.broker.published["b"] == 0
    ran = await run_all(replicas.a)
    assert set(ran) == {"b", "a.ok0"} and replicas.broker.published["b"] == 1


class HeardFollowUps(NoFollowUps):
    """Follow-up hooks that note which records the engine hands to `after_terminal`."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    async def after_terminal(self, records: Sequence[records_pb2.TaskRecord], repair: bool = False) -> None:
        self.ended.extend((r.result.task_id, result_pb2.TaskState.Name(r.result.state)) for r in records)


async def test_a_repaired_failed_node_runs_the_follow_ups_of_the_entries_that_failed_only(replicas: Replicas) -> None:
    # A chord's callback (a group of "a" and "b") is failed by a repair pass; "a" was cancelled
    # before: it ended otherwise, and its follow-ups are not the failure's to run.
    [response] = await submit(replicas.a, flow(chord_of([step("m0")], group_of(step("a"), step("b")))))
    await replicas.a.canceller.cancel("a")
    plan = await replicas.a.store.plan(response.workflow_id)
    assert plan is not None
    nodes = nodes_by_id(plan)
    callback = nodes[nodes[plan.root_node_id].child_ids[1]]
    followups = replicas.a.connections.dispatcher.followups
    heard = HeardFollowUps()
    engine = WorkflowEngine(followups.store, followups.publisher, followups=heard)
    await engine.fail_node(Drive(plan, nodes, repair=True), callback, error("ChordMemberFailed", "m0 failed"))
    assert heard.ended == [("b", "TASK_STATE_FAILURE")]


TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_chains_error_callback_joins_the_trace_current_when_the_chain_failed(
    replicas: Replicas, no_tracer: None,
) -> None:
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), on_error=[task(name="alert")])))
    claim = await lease_all(replicas.a)
    failure = outcome(claim, "a", worker_service_pb2.OUTCOME_FAILURE, error=result_pb2.TaskError(type="Boom"))
    # The span the failure is recorded in (in production: the failed task's "result" span).
    context = trace.SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=trace.TraceFlags(1))
    current = trace.NonRecordingSpan(context)
    with trace.use_span(current):
        await replicas.a.connections.recorder.record([failure], "w1")
    ran = await run_all(replicas.a)
    [alert] = [a for a in ran.values() if a.task.name == "alert"]
    assert alert.task.headers["traceparent"] == TRACEPARENT
