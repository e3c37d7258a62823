"""The workflow engine: starts workflows and moves them on as their tasks end.

It is driven by terminal task results and uses only the Backend primitives (records with
compare-and-set, idempotent group members, one-time claims), so every engine gets workflows.
What a node does when a child ends is its primitive's (core/canvas/: chain, group, chord); the
engine starts tasks, ends nodes that will not run, and submits canvas callbacks.

Idempotency: starting a task flips its record's `enqueued` flag with compare-and-set before
publishing and sets `published` after (core/confirmed.py), so a node is started once however
often its predecessor is reported, and repair resends only what may not have gone out. Group
members are a set keyed by member index; a group completes once (claim). Callbacks get ids
derived from their node, so a repeat submits none twice.

Expiry: a workflow's plan, its tasks' records, its group sets and claims never expire while it
runs; when its root node ends, their result TTL starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2

from .canvas import Drive, NodeOutcome, combine_members, nodes_by_id, outcome_of, primitive_of, task_ids
from .confirmed import publish_confirmed, take_over
from .publisher import Publisher
from .records import TaskStates, error, is_terminal, plan_key, task_key, transition
from .signatures import with_leading_arg
from .store import TaskStore

__all__ = ["WorkflowEngine", "combine_members", "outcome_of"]

log = logging.getLogger(__name__)

PlanNode = records_pb2.PlanNode


class FollowUpHooks(Protocol):
    """What the engine asks of core/followups.py's FollowUps, which builds the engine with itself."""

    async def after_terminal(self, records: Sequence[records_pb2.TaskRecord], repair: bool = False) -> None:
        """Run the usual follow-ups (callbacks, workflow) of records that the engine itself ended."""

    async def fire_callbacks(
        self, id_prefix: str, signatures: Sequence[task_pb2.Signature], argument: task_pb2.Value | result_pb2.TaskError,
        workflow_id: str, headers: Mapping[str, str] | None, repair: bool, *, failed_task_id: str,
    ) -> None:
        """Submit a node's callbacks under ids derived from `id_prefix`, once however often asked."""

    async def replacement_done(
        self, plan: records_pb2.WorkflowPlan, outcome: records_pb2.NodeOutcome, repair: bool,
    ) -> None:
        """A replacement workflow (core/replacement.py) ended: the task it replaces takes `outcome`."""


class _Starts:
    """canvas.base.Starts: what starting a node begins, gathered for one batch."""

    def __init__(self, drive: Drive) -> None:
        self.nodes = drive.nodes
        self.tasks: list[tuple[str, task_pb2.Value | None]] = []
        self.finished: list[tuple[PlanNode, NodeOutcome]] = []

    def child(self, node_id: str) -> PlanNode:
        return self.nodes[node_id]

    def node(self, node: PlanNode, value: task_pb2.Value | None) -> None:
        primitive_of(node).start(node, value, self)

    def task(self, task_id: str, value: task_pb2.Value | None) -> None:
        self.tasks.append((task_id, value))

    def done(self, node: PlanNode, outcome: NodeOutcome) -> None:
        self.finished.append((node, outcome))


class WorkflowEngine:
    """canvas.base.Engine."""

    def __init__(self, store: TaskStore, publisher: Publisher, followups: FollowUpHooks) -> None:
        self.store = store
        self.publisher = publisher
        self.followups = followups

    async def start_workflow(self, plan: records_pb2.WorkflowPlan, repair: bool = False) -> None:
        drive = Drive(plan, nodes_by_id(plan), repair)
        await self.start(drive, drive.nodes[plan.root_node_id], None)

    async def on_task_terminal(self, record: records_pb2.TaskRecord, repair: bool = False) -> None:
        plan = await self.store.plan(record.result.workflow_id)
        if plan is None:
            log.warning("workflow %s of task %s has no plan", record.result.workflow_id, record.result.task_id)
            return
        drive = Drive(plan, nodes_by_id(plan), repair)
        await self.node_done(drive, drive.nodes[record.node_id], outcome_of(record))

    # -- starting nodes -------------------------------------------------------------------

    async def start(
        self, drive: Drive, node: PlanNode, value: task_pb2.Value | None, trace_links: Sequence[str] = (),
    ) -> None:
        starts = _Starts(drive)
        starts.node(node, value)
        await self._launch(drive, starts.tasks, trace_links)
        for done, outcome in starts.finished:
            await self.node_done(drive, done, outcome)

    async def _launch(
        self, drive: Drive, starts: Sequence[tuple[str, task_pb2.Value | None]], trace_links: Sequence[str] = (),
    ) -> None:
        workflow_id = drive.workflow_id
        inputs = dict(starts)
        links = " ".join(trace_links[:tracing.MAX_LINKS])

        def mark_enqueued(task_id: str, record: records_pb2.TaskRecord) -> bool:
            if record.enqueued or is_terminal(record) or record.result.workflow_id != workflow_id:
                return False
            record.enqueued = True
            record.enqueued_at.GetCurrentTime()
            signature = with_leading_arg(record.result.signature, inputs[task_id])
            if signature is not record.result.signature:
                record.result.signature.CopyFrom(signature)
            if links:
                record.result.signature.headers[tracing.LINKS_HEADER] = links
            return True

        launched = await self.store.update(list(inputs), mark_enqueued)
        if drive.repair:
            # The first pass may have stopped between marking and publishing: publish again
            # what is marked but not confirmed as published.
            earlier = [
                loaded.record for task_id, loaded in (await self.store.load(list(inputs))).items()
                if task_id not in launched and loaded.record.result.workflow_id == workflow_id
            ]
            launched.update((r.result.task_id, r) for r in await take_over(self.store, earlier))
        await publish_confirmed(self.store, self.publisher, list(launched.values()), workflow_id)

    # -- finishing nodes ------------------------------------------------------------------

    async def node_done(self, drive: Drive, node: PlanNode, outcome: NodeOutcome) -> None:
        if not node.parent_id:
            await self.finished(drive.plan)
            if drive.plan.replaces_task_id:  # a replacement: the task it replaces ends with it
                await self.followups.replacement_done(drive.plan, outcome, drive.repair)
            return
        parent = drive.nodes[node.parent_id]
        await primitive_of(parent).child_done(self, drive, parent, node, outcome)

    async def fail_node(self, drive: Drive, node: PlanNode, cause: result_pb2.TaskError) -> None:
        """End a node that will not run as failed: its entry tasks fail, and their follow-ups
        carry the failure through the rest of the node as any failure would. On repair, the
        follow-ups of entries failed by an earlier pass run again too (idempotently)."""
        starts = _Starts(drive)
        starts.node(node, None)

        def fail(_: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record) or record.enqueued:
                return False
            record.result.error.CopyFrom(cause)
            transition(record, TaskStates.TASK_STATE_FAILURE, error=cause)
            return True

        entry_ids = [task_id for task_id, _ in starts.tasks]
        failed = await self.store.update(entry_ids, fail)
        if drive.repair:
            for task_id, loaded in (await self.store.load(entry_ids)).items():
                if task_id not in failed and loaded.record.result.state == TaskStates.TASK_STATE_FAILURE:
                    failed[task_id] = loaded.record
        if failed:
            await self.followups.after_terminal(list(failed.values()), drive.repair)
        for empty, _ in starts.finished:
            await self.node_done(drive, empty, NodeOutcome(ok=False, error=cause, state=TaskStates.TASK_STATE_FAILURE))

    async def cancel_unstarted(self, task_ids_: Sequence[str], reason: str) -> None:
        cause = error("Cancelled", reason)

        def cancel(_: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record) or record.enqueued:
                return False
            record.result.error.CopyFrom(cause)
            transition(record, TaskStates.TASK_STATE_CANCELLED, error=cause)
            return True

        await self.store.update(list(task_ids_), cancel)

    async def fire(
        self, drive: Drive, node: PlanNode, suffix: str, callbacks: Sequence[task_pb2.Signature],
        outcome: NodeOutcome,
    ) -> None:
        if not callbacks:
            return
        argument = outcome.value if outcome.ok else outcome.error
        await self.followups.fire_callbacks(
            f"{drive.workflow_id}.{node.node_id}.{suffix}", list(callbacks), argument, drive.workflow_id,
            tracing.inject(), drive.repair, failed_task_id=outcome.task_id,
        )

    async def finished(self, plan: records_pb2.WorkflowPlan) -> None:
        """The workflow ended: the result TTL of its records, plan, groups and claims starts."""
        groups: list[str] = []
        claims: list[str] = []
        for node in plan.nodes:
            node_groups, node_claims = primitive_of(node).stored_keys(plan.workflow_id, node)
            groups.extend(node_groups)
            claims.extend(node_claims)
        await self.store.backend.expire(
            records=[plan_key(plan.workflow_id), *(task_key(t) for t in task_ids(plan))], groups=groups, claims=claims,
        )
