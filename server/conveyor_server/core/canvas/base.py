"""What a canvas primitive is, and what it may ask of the planner, the validator and the engine.

A primitive (task, chain, group, chord) keeps all of its own logic in one module: how it is
checked at submit, planned, started, completed when a child ends, and read back as a result.
`primitives.primitive(kind)` is the one exhaustive dispatch from a kind to its module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, workflow_pb2

from ..store import TaskStore

Nodes = dict[str, records_pb2.PlanNode]
NodeOutcome = records_pb2.NodeOutcome
PlanNode = records_pb2.PlanNode


@dataclass(frozen=True, slots=True)
class Drive:
    """One pass of the engine over a workflow: its plan, the plan's node index, and whether
    the pass repairs an earlier one (then every idempotent step runs again)."""

    plan: records_pb2.WorkflowPlan
    nodes: Nodes
    repair: bool

    @property
    def workflow_id(self) -> str:
        return self.plan.workflow_id


class Checker(Protocol):
    """The submit-time walk over a Workflow (core/validation.py): depth, ids, signatures."""

    def node(self, workflow: workflow_pb2.Workflow, depth: int, where: str) -> None:
        """Check a child node at `depth` (the root is 1)."""

    def task(self, signature: task_pb2.Signature, depth: int, where: str) -> None:
        """Check a task and its callbacks."""

    def callbacks(self, signatures: Sequence[task_pb2.Signature], depth: int, where: str) -> None:
        """Check canvas callbacks (`where` names the list; each gets its index)."""

    def planned_tasks(self, count: int, where: str) -> None:
        """Refuse `count` tasks that a node will expand into, past max_workflow_tasks, before
        any of them is built."""


class Planner(Protocol):
    """Builds a WorkflowPlan (core/planner.py)."""

    def add(self, child: workflow_pb2.Workflow, parent_id: str, index: int) -> str:
        """Plan a child node; returns its node id."""

    def task(self, signature: task_pb2.Signature) -> task_pb2.Signature:
        """The task as it will be stored (id and queue filled in), recorded in the plan."""


class Starts(Protocol):
    """What starting a node begins, gathered so that its tasks go out in one batch."""

    def child(self, node_id: str) -> PlanNode: ...

    def node(self, node: PlanNode, value: task_pb2.Value | None) -> None:
        """Start `node` (a child) with `value` as the leading arg of its first tasks."""

    def task(self, task_id: str, value: task_pb2.Value | None) -> None: ...

    def done(self, node: PlanNode, outcome: NodeOutcome) -> None:
        """`node` ends as it starts (a group without members)."""


class Engine(Protocol):
    """What a primitive may ask of the workflow engine (core/workflow.py) when a child ends."""

    store: TaskStore

    async def start(
        self, drive: Drive, node: PlanNode, value: task_pb2.Value | None, trace_links: Sequence[str] = (),
    ) -> None:
        """Start `node` with `value`; its entry tasks' spans link to the `trace_links` (traceparents)."""

    async def node_done(self, drive: Drive, node: PlanNode, outcome: NodeOutcome) -> None:
        """`node` ended: its parent moves on (or the workflow ends)."""

    async def fail_node(self, drive: Drive, node: PlanNode, cause: result_pb2.TaskError) -> None:
        """End `node`, which will not run, as failed with `cause`."""

    async def cancel_unstarted(self, task_ids: Sequence[str], reason: str) -> None: ...

    async def fire(
        self, drive: Drive, node: PlanNode, suffix: str, callbacks: Sequence[task_pb2.Signature],
        outcome: NodeOutcome,
    ) -> None:
        """Submit the node's `callbacks` with the outcome (its value, or its error as a JSON
        object), under ids `<workflow>.<node>.<suffix><i>` so that a repeat submits none twice."""


class Reading(Protocol):
    """Outcomes as the stored records show them now (None: not ended yet)."""

    def task(self, task_id: str) -> NodeOutcome | None: ...

    def node(self, node_id: str) -> NodeOutcome | None: ...

    def first_task(self, node_id: str) -> str:
        """The task that starts the node (see tree.first_task)."""


class Primitive(Protocol):
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        """Refuse what this primitive cannot run; check children and callbacks through `checker`."""

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        """Fill `node` (kind and ids are set) from `workflow`, planning children through `planner`."""

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        """The signatures (mutable, in `workflow`) of the tasks that start when the node does."""

    def start(self, node: PlanNode, value: task_pb2.Value | None, starts: Starts) -> None: ...

    async def child_done(
        self, engine: Engine, drive: Drive, node: PlanNode, child: PlanNode, outcome: NodeOutcome,
    ) -> None: ...

    def resolve(self, node: PlanNode, reading: Reading) -> NodeOutcome | None:
        """The node's outcome from its children's, or None while it runs."""

    def result_child(self, node: PlanNode) -> str:
        """The child whose result is the node's result ("" when it is not one child's)."""

    def stored_keys(self, workflow_id: str, node: PlanNode) -> tuple[list[str], list[str]]:
        """The backend groups and claims the node keeps while the workflow runs."""
