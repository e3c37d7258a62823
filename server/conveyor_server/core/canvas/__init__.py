"""Canvas primitives: one module per kind of workflow node (task, chain, group, chord, map), each
holding how that kind is checked, planned, started, completed and read back.

Adding a primitive: a `Kind` member (and PlanNodeKind value), a module implementing
`base.Primitive`, its case in `primitives.primitive` and `kinds.workflow_kind` (mypy reports
both as non-exhaustive until then), and the SDK builders.
"""

from .base import Drive, NodeOutcome, Nodes, Primitive
from .group import combine_members
from .kinds import CorruptPlan, Kind, kind_of, set_kind, workflow_kind
from .primitives import primitive, primitive_of
from .task import outcome_of
from .tree import first_task, nodes_by_id, task_ids

__all__ = [
    "CorruptPlan",
    "Drive",
    "Kind",
    "NodeOutcome",
    "Nodes",
    "Primitive",
    "combine_members",
    "first_task",
    "kind_of",
    "nodes_by_id",
    "outcome_of",
    "primitive",
    "primitive_of",
    "set_kind",
    "task_ids",
    "workflow_kind",
]
