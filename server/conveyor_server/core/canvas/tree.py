"""Reading a WorkflowPlan as a tree; nothing here depends on what kind a node is."""

from __future__ import annotations

from collections import OrderedDict

from conveyor.internal.v1 import records_pb2

from .base import Nodes

# Plans never change once compiled, so their node index is built once per workflow, not on
# every task completion (a 10,000-member group would otherwise rebuild it 10,000 times).
_INDEX_CACHE_SIZE = 1024
_indexes: OrderedDict[tuple[str, int], Nodes] = OrderedDict()


def nodes_by_id(plan: records_pb2.WorkflowPlan) -> Nodes:
    key = (plan.workflow_id, len(plan.nodes))
    index = _indexes.get(key)
    if index is None:
        index = _indexes[key] = {node.node_id: node for node in plan.nodes}
        if len(_indexes) > _INDEX_CACHE_SIZE:
            _indexes.popitem(last=False)
    else:
        _indexes.move_to_end(key)
    return index


def task_ids(plan: records_pb2.WorkflowPlan, node_id: str | None = None) -> list[str]:
    """Every task id under a node (the whole plan by default), depth first."""
    nodes = nodes_by_id(plan)
    found: list[str] = []
    stack = [node_id or plan.root_node_id]
    while stack:
        node = nodes[stack.pop()]
        if node.task_id:
            found.append(node.task_id)
        stack.extend(reversed(node.child_ids))
    return found


def first_task(nodes: Nodes, node_id: str) -> str:
    """The task that starts a node: a chain's first step, a group's first member ("" for a
    group without members)."""
    node = nodes[node_id]
    while not node.task_id and node.child_ids:
        node = nodes[node.child_ids[0]]
    return node.task_id
