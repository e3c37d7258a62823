"""Canvas primitives: one module per kind of workflow node (task, chain, group, chord, map), each
holding how that kind is checked, planned, started, completed and read back.

Adding a primitive: a `Kind` member (and PlanNodeKind value), a module implementing
`base.Primitive`, its case in `primitives.primitive`, `kinds.workflow_kind` and
`signatures._parts` (mypy reports each as non-exhaustive until then), and the SDK builders. A
new callback list goes into `signatures._parts` too: the one walk that strict submits, JSON
checks, task counts and the submit rate limit share.
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
