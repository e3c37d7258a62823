"""Flattens a submitted Workflow tree into a WorkflowPlan: one node per task or canvas."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, workflow_pb2


@dataclass
class CompiledWorkflow:
    plan: records_pb2.WorkflowPlan
    # Task id -> the signature as submitted (ids and queues filled in).
    signatures: dict[str, task_pb2.Signature] = field(default_factory=dict)


# Plans never change once compiled, so their node index is built once per workflow, not on
# every task completion (a 10,000-member group would otherwise rebuild it 10,000 times).
_INDEX_CACHE_SIZE = 1024
_indexes: OrderedDict[tuple[str, int], dict[str, records_pb2.PlanNode]] = OrderedDict()


def nodes_by_id(plan: records_pb2.WorkflowPlan) -> dict[str, records_pb2.PlanNode]:
    key = (plan.workflow_id, len(plan.nodes))
    index = _indexes.get(key)
    if index is None:
        index = _indexes[key] = {node.node_id: node for node in plan.nodes}
        if len(_indexes) > _INDEX_CACHE_SIZE:
            _indexes.popitem(last=False)
    else:
        _indexes.move_to_end(key)
    return index


def compile_workflow(
    workflow: workflow_pb2.Workflow,
    workflow_id: str,
    fill: Callable[[task_pb2.Signature], task_pb2.Signature],
) -> CompiledWorkflow:
    """`fill` completes a signature (id, queue, trace headers) before it is stored."""
    compiled = CompiledWorkflow(records_pb2.WorkflowPlan(workflow_id=workflow_id))
    compiled.plan.source.CopyFrom(workflow)
    root = _add(compiled, workflow, parent_id="", index=0, fill=fill)
    compiled.plan.root_node_id = root
    return compiled


def _add(
    compiled: CompiledWorkflow,
    node: workflow_pb2.Workflow,
    parent_id: str,
    index: int,
    fill: Callable[[task_pb2.Signature], task_pb2.Signature],
) -> str:
    node_id = f"n{len(compiled.plan.nodes)}"
    kind = node.WhichOneof("kind") or "task"
    plan_node = compiled.plan.nodes.add(node_id=node_id, kind=kind, parent_id=parent_id, index=index)
    if kind == "task":
        signature = fill(node.task)
        plan_node.task_id = signature.id
        compiled.signatures[signature.id] = signature
        return node_id
    children: list[str] = []
    if kind == "chain":
        plan_node.on_error.extend(node.chain.on_error)
        children = [_add(compiled, step, node_id, i, fill) for i, step in enumerate(node.chain.steps)]
    elif kind == "group":
        plan_node.on_error.extend(node.group.on_error)
        children = [_add(compiled, member, node_id, i, fill) for i, member in enumerate(node.group.members)]
    else:
        plan_node.failure_policy = node.chord.failure_policy
        header = workflow_pb2.Workflow(group=node.chord.header)
        children = [_add(compiled, header, node_id, 0, fill), _add(compiled, node.chord.callback, node_id, 1, fill)]
    plan_node.child_ids.extend(children)
    return node_id


def result_task_id(plan: records_pb2.WorkflowPlan, node_id: str | None = None) -> str:
    """The task whose result is the node's result; empty for a group (its result is a list)."""
    nodes = nodes_by_id(plan)
    node = nodes[node_id or plan.root_node_id]
    while node.kind != "task":
        if node.kind == "group" or not node.child_ids:
            return ""
        node = nodes[node.child_ids[-1]]
    return node.task_id


def task_ids(plan: records_pb2.WorkflowPlan, node_id: str | None = None) -> list[str]:
    """Every task id under a node (the whole plan by default), depth first."""
    nodes = nodes_by_id(plan)
    found: list[str] = []
    stack = [node_id or plan.root_node_id]
    while stack:
        node = nodes[stack.pop()]
        if node.kind == "task":
            found.append(node.task_id)
        stack.extend(reversed(node.child_ids))
    return found


def new_workflow_id() -> str:
    return f"wf-{uuid.uuid4()}"
