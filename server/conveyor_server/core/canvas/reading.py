"""A workflow's outcome as its stored records show it, read without the engine: what GetResult
on a workflow id answers. Each primitive combines its children's outcomes as its engine code
does (`Primitive.resolve`), so a read agrees with what the engine passed on."""

from __future__ import annotations

from collections.abc import Mapping

from conveyor.internal.v1 import records_pb2

from ..records import is_terminal
from .base import NodeOutcome, Nodes
from .primitives import primitive_of
from .task import outcome_of
from .tree import first_task, nodes_by_id


def workflow_outcome(
    plan: records_pb2.WorkflowPlan, records: Mapping[str, records_pb2.TaskRecord]
) -> NodeOutcome | None:
    """The root's outcome, or None while the workflow runs. `records`: its tasks' records."""
    return _Reading(nodes_by_id(plan), records).node(plan.root_node_id)


class _Reading:
    def __init__(self, nodes: Nodes, records: Mapping[str, records_pb2.TaskRecord]) -> None:
        self.nodes = nodes
        self.records = records

    def task(self, task_id: str) -> NodeOutcome | None:
        record = self.records.get(task_id)
        return outcome_of(record) if record is not None and is_terminal(record) else None

    def node(self, node_id: str) -> NodeOutcome | None:
        node = self.nodes[node_id]
        return primitive_of(node).resolve(node, self)

    def first_task(self, node_id: str) -> str:
        return first_task(self.nodes, node_id)
