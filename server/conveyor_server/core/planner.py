"""Flattens a submitted Workflow tree into a WorkflowPlan: one node per task or canvas.

Each node's own fields are filled by its primitive (core/canvas/); a plan is written once and
never changes. Run after validation (core/validation.py), which refuses what cannot be planned.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, workflow_pb2

from .canvas import Kind, kind_of, nodes_by_id, primitive, set_kind, task_ids, workflow_kind
from .errors import InvalidArgument

__all__ = ["CompiledWorkflow", "compile_workflow", "new_workflow_id", "nodes_by_id", "result_task_id", "task_ids"]

Fill = Callable[[task_pb2.Signature], task_pb2.Signature]


@dataclass
class CompiledWorkflow:
    plan: records_pb2.WorkflowPlan
    # Task id -> the signature as submitted (ids and queues filled in).
    signatures: dict[str, task_pb2.Signature] = field(default_factory=dict)


def compile_workflow(workflow: workflow_pb2.Workflow, workflow_id: str, fill: Fill) -> CompiledWorkflow:
    """`fill` completes a signature (id, queue, trace headers) before it is stored."""
    # The plan keeps no copy of `workflow` (WorkflowPlan.source): its nodes and the task records
    # hold all that runs, and a copy would grow the plan with every map item and group member.
    compiled = CompiledWorkflow(records_pb2.WorkflowPlan(workflow_id=workflow_id))
    compiled.plan.root_node_id = _Planner(compiled, fill).add(workflow, "", 0)
    return compiled


class _Planner:
    """canvas.base.Planner over one CompiledWorkflow."""

    def __init__(self, compiled: CompiledWorkflow, fill: Fill) -> None:
        self.compiled = compiled
        self.fill = fill

    def add(self, child: workflow_pb2.Workflow, parent_id: str, index: int) -> str:
        kind = workflow_kind(child)
        if kind is None:
            raise InvalidArgument("empty workflow node; set task, chain, group, chord or map")
        plan = self.compiled.plan
        node = plan.nodes.add(node_id=f"n{len(plan.nodes)}", parent_id=parent_id, index=index)
        set_kind(node, kind)
        primitive(kind).plan(child, node, self)
        return node.node_id

    def task(self, signature: task_pb2.Signature) -> task_pb2.Signature:
        complete = self.fill(signature)
        if complete.id in self.compiled.signatures:
            raise InvalidArgument(f"the workflow uses task id {complete.id!r} more than once")
        self.compiled.signatures[complete.id] = complete
        return complete


def result_task_id(plan: records_pb2.WorkflowPlan, node_id: str | None = None) -> str:
    """The task whose result is the node's result; empty when that result is a list (a group,
    or a chain ending in one): GetResult on the workflow id reads any workflow's result."""
    nodes = nodes_by_id(plan)
    node = nodes[node_id or plan.root_node_id]
    while (kind := kind_of(node)) is not Kind.TASK:
        child = primitive(kind).result_child(node)
        if not child:
            return ""
        node = nodes[child]
    return node.task_id


def new_workflow_id() -> str:
    return f"wf-{uuid.uuid4()}"
