"""Group: members in parallel; its result is the JSON list of member results in member order
(a member that is itself a group gives a nested list: nesting is kept, not flattened).

Members are counted idempotently: each ended member is stored once in a backend group keyed by
its index, and the group completes once (an atomic claim), however often members are reported.
A failed member shows in the list as {"error": {"type", "message"}} and fails the group with
GroupMemberFailed once all members ended. Callbacks: `on_member_error` once per failed member as
it fails (Celery's group.link_error), `on_error` once for the failed group, `on_success` with
the list once every member succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

from conveyor import tracing
from conveyor.v1 import task_pb2, workflow_pb2
from conveyor.values import to_jsonable

from ..records import TaskStates, error
from .base import Checker, Drive, Engine, NodeOutcome, Planner, PlanNode, Reading, Starts
from .tree import first_task


def members_key(workflow_id: str, node_id: str) -> str:
    return f"grp:{workflow_id}:{node_id}"


def done_key(workflow_id: str, node_id: str) -> str:
    return f"done:{workflow_id}:{node_id}"


def combine_members(members: Sequence[NodeOutcome], member_tasks: Sequence[str]) -> NodeOutcome:
    """A group's outcome: the JSON list of member results; failed members as error objects."""
    values = []
    failures = []
    failed: list[NodeOutcome] = []
    for index, member in enumerate(members):
        if member.ok:
            values.append(to_jsonable(member.value))
        else:
            values.append({"error": {"type": member.error.type, "message": member.error.message}})
            failures.append(f"member {index} ({member_tasks[index]}): {member.error.type}: {member.error.message}")
            failed.append(member)
    combined = NodeOutcome(ok=not failures, members=members, state=TaskStates.TASK_STATE_SUCCESS)
    combined.value.json_value = json.dumps(values)
    if failed:
        combined.error.CopyFrom(error("GroupMemberFailed", "; ".join(failures)))
        combined.task_id = failed[0].task_id
        every_cancelled = all(member.state == TaskStates.TASK_STATE_CANCELLED for member in failed)
        combined.state = TaskStates.TASK_STATE_CANCELLED if every_cancelled else TaskStates.TASK_STATE_FAILURE
    return combined


def check_members(group: workflow_pb2.Group, checker: Checker, depth: int, where: str, member_where: str) -> None:
    """A group's members at `depth` (named `<member_where>[i]`) and its callbacks."""
    for i, member in enumerate(group.members):
        checker.node(member, depth, f"{member_where}[{i}]")
    checker.callbacks(group.on_error, depth, f"{where}.on_error")
    checker.callbacks(group.on_success, depth, f"{where}.on_success")
    checker.callbacks(group.on_member_error, depth, f"{where}.on_member_error")


class GroupPrimitive:
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        check_members(workflow.group, checker, depth + 1, f"{where}.group", f"{where}.group")

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        group = workflow.group
        node.on_error.extend(group.on_error)
        node.on_success.extend(group.on_success)
        node.on_member_error.extend(group.on_member_error)
        node.child_ids.extend(planner.add(member, node.node_id, i) for i, member in enumerate(group.members))

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        for member in workflow.group.members:
            yield from entries(member)

    def start(self, node: PlanNode, value: task_pb2.Value | None, starts: Starts) -> None:
        if not node.child_ids:
            empty = NodeOutcome(ok=True, state=TaskStates.TASK_STATE_SUCCESS)
            empty.value.json_value = "[]"
            starts.done(node, empty)
        for child in node.child_ids:
            starts.node(starts.child(child), value)

    async def child_done(
        self, engine: Engine, drive: Drive, node: PlanNode, child: PlanNode, outcome: NodeOutcome,
    ) -> None:
        if not outcome.ok:
            # Before the member is counted, so that a repair of this pass fires it too.
            await engine.fire(drive, node, f"m{child.index}.err", node.on_member_error, outcome)
        # Inside the span the member ended in (its last task's "result" span): a chord callback links to it.
        traceparent = tracing.inject().get("traceparent", "")
        if traceparent:
            marked = NodeOutcome()
            marked.CopyFrom(outcome)
            marked.traceparent = traceparent
            outcome = marked
        backend = engine.store.backend
        key = members_key(drive.workflow_id, node.node_id)
        count = await backend.add_member(key, str(child.index), outcome.SerializeToString(), keep=True)
        if count < len(node.child_ids):
            return
        if not await backend.claim(done_key(drive.workflow_id, node.node_id), keep=True) and not drive.repair:
            return
        payloads = await backend.members(key)
        members = []
        for index in range(len(node.child_ids)):
            member = NodeOutcome()
            member.ParseFromString(payloads[str(index)])
            members.append(member)
        combined = self.combine(node, members, [first_task(drive.nodes, c) for c in node.child_ids])
        if combined.ok:
            await engine.fire(drive, node, "ok", node.on_success, combined)
        else:
            await engine.fire(drive, node, "err", node.on_error, combined)
        await engine.node_done(drive, node, combined)

    def resolve(self, node: PlanNode, reading: Reading) -> NodeOutcome | None:
        members = []
        for child in node.child_ids:
            outcome = reading.node(child)
            if outcome is None:
                return None
            members.append(outcome)
        return self.combine(node, members, [reading.first_task(c) for c in node.child_ids])

    def combine(self, node: PlanNode, members: Sequence[NodeOutcome], member_tasks: Sequence[str]) -> NodeOutcome:
        """The node's outcome once every member ended (a map overrides this to flatten)."""
        return combine_members(members, member_tasks)

    def result_child(self, node: PlanNode) -> str:
        return ""

    def stored_keys(self, workflow_id: str, node: PlanNode) -> tuple[list[str], list[str]]:
        return [members_key(workflow_id, node.node_id)], [done_key(workflow_id, node.node_id)]


GROUP = GroupPrimitive()
