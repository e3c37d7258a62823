"""The kinds of workflow nodes: one enum that every dispatch on a kind matches exhaustively,
so that mypy names each place a new kind must be handled (no `else:` that means "chord")."""

from __future__ import annotations

import enum
from typing import assert_never

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import workflow_pb2


class Kind(enum.Enum):
    TASK = records_pb2.PLAN_NODE_KIND_TASK
    CHAIN = records_pb2.PLAN_NODE_KIND_CHAIN
    GROUP = records_pb2.PLAN_NODE_KIND_GROUP
    CHORD = records_pb2.PLAN_NODE_KIND_CHORD
    MAP = records_pb2.PLAN_NODE_KIND_MAP

    @property
    def label(self) -> str:
        """"task", "chain", ...: the name the API shows (GetWorkflow) and older plans stored."""
        return self.name.lower()


class CorruptPlan(RuntimeError):
    """A stored plan names a kind this server does not know (written by a newer release?)."""


# Plans stored before kinds were an enum name them in `legacy_kind`.
_BY_LABEL = {kind.label: kind for kind in Kind}


def kind_of(node: records_pb2.PlanNode) -> Kind:
    if node.kind:
        try:
            return Kind(node.kind)
        except ValueError:
            raise CorruptPlan(f"plan node {node.node_id} has unknown kind {node.kind}") from None
    found = _BY_LABEL.get(node.legacy_kind)
    if found is None:
        raise CorruptPlan(f"plan node {node.node_id} has no kind (legacy kind {node.legacy_kind!r})")
    return found


def set_kind(node: records_pb2.PlanNode, kind: Kind) -> None:
    node.kind = kind.value
    node.legacy_kind = kind.label  # read by replicas of the previous release (see records.proto)


def workflow_kind(workflow: workflow_pb2.Workflow) -> Kind | None:
    """The kind a submitted Workflow node asks for; None when it sets none."""
    which = workflow.WhichOneof("kind")
    match which:
        case "task":
            return Kind.TASK
        case "chain":
            return Kind.CHAIN
        case "group":
            return Kind.GROUP
        case "chord":
            return Kind.CHORD
        case "map":
            return Kind.MAP
        case None:
            return None
        case _:
            assert_never(which)
