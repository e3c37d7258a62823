"""Chord: a group (the header, child 0), then a callback (child 1) run once with the header's
list of results in member order. Its result is the callback's.

When a header member failed, the failure policy decides: FAIL (the default) ends the callback
FAILED with ChordMemberFailed naming the failed members, without running it; CONTINUE runs it
with the partial list (failed members as error objects). The callback's own callbacks then run
as after any failure, which is how a chord's error callback works (Celery links a chord's
errback to its body too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from conveyor import tracing
from conveyor.v1 import task_pb2, workflow_pb2

from ..errors import InvalidArgument
from ..records import error
from .base import Checker, Drive, Engine, NodeOutcome, Planner, PlanNode, Reading, Starts
from .group import check_members

HEADER, CALLBACK = 0, 1


class ChordPrimitive:
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        chord = workflow.chord
        if not chord.HasField("callback"):
            raise InvalidArgument(f"{where}: a chord needs a callback")
        # The header is a group inside the chord: its members are two levels down.
        check_members(chord.header, checker, depth + 2, f"{where}.chord.header", f"{where}.chord.header")
        checker.node(chord.callback, depth + 1, f"{where}.chord.callback")

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        chord = workflow.chord
        node.failure_policy = chord.failure_policy
        header = planner.add(workflow_pb2.Workflow(group=chord.header), node.node_id, HEADER)
        node.child_ids.extend([header, planner.add(chord.callback, node.node_id, CALLBACK)])

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        for member in workflow.chord.header.members:
            yield from entries(member)

    def start(self, node: PlanNode, value: task_pb2.Value | None, starts: Starts) -> None:
        starts.node(starts.child(node.child_ids[HEADER]), value)

    async def child_done(
        self, engine: Engine, drive: Drive, node: PlanNode, child: PlanNode, outcome: NodeOutcome,
    ) -> None:
        if child.index == CALLBACK:
            await engine.node_done(drive, node, outcome)
            return
        callback = drive.nodes[node.child_ids[CALLBACK]]
        if outcome.ok or node.failure_policy == workflow_pb2.CHORD_FAILURE_POLICY_CONTINUE:
            # The callback's spans link to its members' spans (the first MAX_LINKS of them).
            links = [m.traceparent for m in outcome.members if m.traceparent][:tracing.MAX_LINKS]
            await engine.start(drive, callback, outcome.value, links)
            return
        await engine.fail_node(drive, callback, error("ChordMemberFailed", outcome.error.message))

    def resolve(self, node: PlanNode, reading: Reading) -> NodeOutcome | None:
        return reading.node(node.child_ids[CALLBACK])

    def result_child(self, node: PlanNode) -> str:
        return node.child_ids[CALLBACK]

    def stored_keys(self, workflow_id: str, node: PlanNode) -> tuple[list[str], list[str]]:
        return [], []  # its header is a group node of its own


CHORD = ChordPrimitive()
