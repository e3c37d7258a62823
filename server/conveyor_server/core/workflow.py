"""The workflow engine: advances chains, counts groups and fires chord callbacks.

It is driven by terminal task results and uses only the Backend primitives (records with
compare-and-set, idempotent group members, one-time claims), so every engine gets workflows.

Idempotency: starting a task flips its record's `enqueued` flag with compare-and-set before
publishing and sets `published` after (core/confirmed.py), so a node is started once however
often its predecessor is reported, and repair resends only what may not have gone out. Group
members are a set keyed by member index; a group completes once (claim).

Expiry: a workflow's plan, its tasks' records, its group sets and claims never expire while it
runs; when its root node ends, their result TTL starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, workflow_pb2
from conveyor.values import to_jsonable

from .confirmed import publish_confirmed, take_over
from .planner import nodes_by_id, task_ids
from .publisher import Publisher
from .records import S, error, is_terminal, plan_key, task_key, transition
from .signatures import with_leading_arg
from .store import TaskStore

log = logging.getLogger(__name__)

Nodes = dict[str, records_pb2.PlanNode]
NodeOutcome = records_pb2.NodeOutcome
# Runs the usual follow-ups (callbacks, workflow) of records that the engine itself ended.
TerminalHook = Callable[[Sequence[records_pb2.TaskRecord], bool], Awaitable[None]]


def outcome_of(record: records_pb2.TaskRecord) -> NodeOutcome:
    result = record.result
    if result.state == S.TASK_STATE_SUCCESS:
        return NodeOutcome(ok=True, value=result.result)
    if result.state == S.TASK_STATE_CANCELLED:
        return NodeOutcome(ok=False, error=result.error if result.HasField("error") else error(
            "Cancelled", f"task {result.task_id} was cancelled"))
    return NodeOutcome(ok=False, error=result.error)


def combine_members(members: Sequence[NodeOutcome], member_tasks: Sequence[str]) -> NodeOutcome:
    """A group's outcome: the JSON list of member results; failed members as error objects."""
    values = []
    failures = []
    for index, member in enumerate(members):
        if member.ok:
            values.append(to_jsonable(member.value))
        else:
            values.append({"error": {"type": member.error.type, "message": member.error.message}})
            failures.append(f"member {index} ({member_tasks[index]}): {member.error.type}: {member.error.message}")
    combined = NodeOutcome(ok=not failures, members=members)
    combined.value.json_value = json.dumps(values)
    if failures:
        combined.error.CopyFrom(error("GroupMemberFailed", "; ".join(failures)))
    return combined


class WorkflowEngine:
    def __init__(self, store: TaskStore, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher
        self.on_engine_terminal: TerminalHook | None = None
        self.fire_callbacks: Callable[..., Awaitable[None]] | None = None

    async def start_workflow(self, plan: records_pb2.WorkflowPlan, repair: bool = False) -> None:
        nodes = nodes_by_id(plan)
        await self._start(plan, nodes, nodes[plan.root_node_id], None, repair)

    async def on_task_terminal(self, record: records_pb2.TaskRecord, repair: bool = False) -> None:
        plan = await self.store.plan(record.result.workflow_id)
        if plan is None:
            log.warning("workflow %s of task %s has no plan", record.result.workflow_id, record.result.task_id)
            return
        nodes = nodes_by_id(plan)
        await self._node_done(plan, nodes, nodes[record.node_id], outcome_of(record), repair)

    # -- starting nodes -------------------------------------------------------------------

    async def _start(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, node: records_pb2.PlanNode,
        value: task_pb2.Value | None, repair: bool,
    ) -> None:
        starts: list[tuple[str, task_pb2.Value | None]] = []
        empty_groups: list[records_pb2.PlanNode] = []
        self._collect(nodes, node, value, starts, empty_groups)
        await self._launch(plan.workflow_id, starts, repair)
        for group in empty_groups:
            done = NodeOutcome(ok=True)
            done.value.json_value = "[]"
            await self._node_done(plan, nodes, group, done, repair)

    def _collect(
        self, nodes: Nodes, node: records_pb2.PlanNode, value: task_pb2.Value | None,
        starts: list[tuple[str, task_pb2.Value | None]], empty_groups: list[records_pb2.PlanNode],
    ) -> None:
        if node.kind == "task":
            starts.append((node.task_id, value))
        elif node.kind in {"chain", "chord"}:
            self._collect(nodes, nodes[node.child_ids[0]], value, starts, empty_groups)
        elif not node.child_ids:
            empty_groups.append(node)
        else:
            for child in node.child_ids:
                self._collect(nodes, nodes[child], value, starts, empty_groups)

    async def _launch(
        self, workflow_id: str, starts: Sequence[tuple[str, task_pb2.Value | None]], repair: bool
    ) -> None:
        inputs = dict(starts)

        def mark_enqueued(task_id: str, record: records_pb2.TaskRecord) -> bool:
            if record.enqueued or is_terminal(record) or record.result.workflow_id != workflow_id:
                return False
            record.enqueued = True
            record.enqueued_at.GetCurrentTime()
            signature = with_leading_arg(record.result.signature, inputs[task_id])
            if signature is not record.result.signature:
                record.result.signature.CopyFrom(signature)
            return True

        launched = await self.store.update(list(inputs), mark_enqueued)
        if repair:
            # The first pass may have stopped between marking and publishing: publish again
            # what is marked but not confirmed as published.
            earlier = [
                loaded.record for task_id, loaded in (await self.store.load(list(inputs))).items()
                if task_id not in launched and loaded.record.result.workflow_id == workflow_id
            ]
            launched.update((r.result.task_id, r) for r in await take_over(self.store, earlier))
        await publish_confirmed(self.store, self.publisher, list(launched.values()), workflow_id)

    # -- finishing nodes ------------------------------------------------------------------

    async def _node_done(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, node: records_pb2.PlanNode,
        outcome: NodeOutcome, repair: bool,
    ) -> None:
        if not node.parent_id:
            await self.finished(plan)
            return
        parent = nodes[node.parent_id]
        if parent.kind == "chain":
            await self._chain_step_done(plan, nodes, parent, node, outcome, repair)
        elif parent.kind == "group":
            await self._group_member_done(plan, nodes, parent, node, outcome, repair)
        else:
            await self._chord_part_done(plan, nodes, parent, node, outcome, repair)

    async def _chain_step_done(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, chain: records_pb2.PlanNode,
        step: records_pb2.PlanNode, outcome: NodeOutcome, repair: bool,
    ) -> None:
        if outcome.ok:
            if step.index + 1 < len(chain.child_ids):
                next_step = nodes[chain.child_ids[step.index + 1]]
                await self._start(plan, nodes, next_step, outcome.value, repair)
            else:
                await self._node_done(plan, nodes, chain, outcome, repair)
            return
        remaining = [t for child in chain.child_ids[step.index + 1:] for t in task_ids(plan, child)]
        await self._cancel_unstarted(remaining, f"an earlier step of chain {chain.node_id} failed")
        await self._fire_errors(plan, chain, outcome, repair)
        await self._node_done(plan, nodes, chain, outcome, repair)

    async def _group_member_done(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, group: records_pb2.PlanNode,
        member: records_pb2.PlanNode, outcome: NodeOutcome, repair: bool,
    ) -> None:
        backend = self.store.backend
        members_key = _members_key(plan.workflow_id, group.node_id)
        count = await backend.add_member(members_key, str(member.index), outcome.SerializeToString(), keep=True)
        if count < len(group.child_ids):
            return
        if not await backend.claim(_done_key(plan.workflow_id, group.node_id), keep=True) and not repair:
            return
        payloads = await backend.members(members_key)
        members = []
        for index in range(len(group.child_ids)):
            member_outcome = NodeOutcome()
            member_outcome.ParseFromString(payloads[str(index)])
            members.append(member_outcome)
        member_tasks = [_first_task(plan, nodes, child) for child in group.child_ids]
        combined = combine_members(members, member_tasks)
        if not combined.ok:
            await self._fire_errors(plan, group, combined, repair)
        await self._node_done(plan, nodes, group, combined, repair)

    async def _chord_part_done(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, chord: records_pb2.PlanNode,
        part: records_pb2.PlanNode, outcome: NodeOutcome, repair: bool,
    ) -> None:
        if part.index == 1:
            await self._node_done(plan, nodes, chord, outcome, repair)
            return
        callback = nodes[chord.child_ids[1]]
        policy = chord.failure_policy
        if outcome.ok or policy == workflow_pb2.ChordFailurePolicy.CHORD_FAILURE_POLICY_CONTINUE:
            await self._start(plan, nodes, callback, outcome.value, repair)
            return
        await self._fail_node(plan, nodes, callback, error("ChordMemberFailed", outcome.error.message), repair)

    async def _fail_node(
        self, plan: records_pb2.WorkflowPlan, nodes: Nodes, node: records_pb2.PlanNode,
        cause: result_pb2.TaskError, repair: bool,
    ) -> None:
        """End a node that will not run as failed: its entry tasks fail, and their follow-ups
        carry the failure through the rest of the node as any failure would. On repair, the
        follow-ups of entries failed by an earlier pass run again too (idempotently)."""
        entries: list[tuple[str, task_pb2.Value | None]] = []
        empty_groups: list[records_pb2.PlanNode] = []
        self._collect(nodes, node, None, entries, empty_groups)

        def fail(_: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record) or record.enqueued:
                return False
            record.result.error.CopyFrom(cause)
            transition(record, S.TASK_STATE_FAILURE, error=cause)
            return True

        entry_ids = [task_id for task_id, _ in entries]
        failed = await self.store.update(entry_ids, fail)
        if repair:
            for task_id, loaded in (await self.store.load(entry_ids)).items():
                if task_id not in failed and loaded.record.result.state == S.TASK_STATE_FAILURE:
                    failed[task_id] = loaded.record
        if failed and self.on_engine_terminal is not None:
            await self.on_engine_terminal(list(failed.values()), repair)
        for group in empty_groups:
            await self._node_done(plan, nodes, group, NodeOutcome(ok=False, error=cause), repair)

    async def _cancel_unstarted(self, task_ids_: Sequence[str], reason: str) -> None:
        cause = error("Cancelled", reason)

        def cancel(_: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record) or record.enqueued:
                return False
            record.result.error.CopyFrom(cause)
            transition(record, S.TASK_STATE_CANCELLED, error=cause)
            return True

        await self.store.update(list(task_ids_), cancel)

    async def _fire_errors(
        self, plan: records_pb2.WorkflowPlan, node: records_pb2.PlanNode, outcome: NodeOutcome, repair: bool
    ) -> None:
        if node.on_error and self.fire_callbacks is not None:
            await self.fire_callbacks(
                f"{plan.workflow_id}.{node.node_id}.err", list(node.on_error), outcome.error, plan.workflow_id,
                tracing.inject(), repair,
            )

    async def finished(self, plan: records_pb2.WorkflowPlan) -> None:
        """The workflow ended: the result TTL of its records, plan, groups and claims starts."""
        nodes = [n for n in plan.nodes if n.kind in ("group", "chord")]
        await self.store.backend.expire(
            records=[plan_key(plan.workflow_id), *(task_key(t) for t in task_ids(plan))],
            groups=[_members_key(plan.workflow_id, n.node_id) for n in nodes],
            claims=[_done_key(plan.workflow_id, n.node_id) for n in nodes],
        )


def _members_key(workflow_id: str, node_id: str) -> str:
    return f"grp:{workflow_id}:{node_id}"


def _done_key(workflow_id: str, node_id: str) -> str:
    return f"done:{workflow_id}:{node_id}"


def _first_task(plan: records_pb2.WorkflowPlan, nodes: Nodes, node_id: str) -> str:
    """The task that starts a node: a chain's first step, a group's first member."""
    node = nodes[node_id]
    while node.kind != "task" and node.child_ids:
        node = nodes[node.child_ids[0]]
    return node.task_id if node.kind == "task" else ""
