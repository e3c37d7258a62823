"""Task: one signature run by a worker, the leaf of every canvas. Its outcome is its record's."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, workflow_pb2

from ..records import TaskStates, error
from .base import Checker, Drive, Engine, NodeOutcome, Planner, PlanNode, Reading, Starts
from .kinds import CorruptPlan


def outcome_of(record: records_pb2.TaskRecord) -> NodeOutcome:
    """How a task ended, as its workflow sees it (a cancelled task is a failure there)."""
    result = record.result
    if result.state == TaskStates.TASK_STATE_SUCCESS:
        return NodeOutcome(ok=True, value=result.result, task_id=result.task_id, state=result.state)
    cause = result.error
    if result.state == TaskStates.TASK_STATE_CANCELLED and not result.HasField("error"):
        cause = error("Cancelled", f"task {result.task_id} was cancelled")
    return NodeOutcome(ok=False, error=cause, task_id=result.task_id, state=result.state)


class TaskPrimitive:
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        checker.task(workflow.task, depth, where)

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        node.task_id = planner.task(workflow.task).id

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        yield workflow.task

    def start(self, node: PlanNode, value: task_pb2.Value | None, starts: Starts) -> None:
        starts.task(node.task_id, value)

    async def child_done(
        self, engine: Engine, drive: Drive, node: PlanNode, child: PlanNode, outcome: NodeOutcome,
    ) -> None:
        raise CorruptPlan(f"task node {node.node_id} of workflow {drive.workflow_id} has a child {child.node_id}")

    def resolve(self, node: PlanNode, reading: Reading) -> NodeOutcome | None:
        return reading.task(node.task_id)

    def result_child(self, node: PlanNode) -> str:
        return ""

    def stored_keys(self, workflow_id: str, node: PlanNode) -> tuple[list[str], list[str]]:
        return [], []


TASK = TaskPrimitive()
