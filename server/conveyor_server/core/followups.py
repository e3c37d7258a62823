"""What happens after a task ends: its callbacks, and the next move of its workflow.

Every step is idempotent, so the whole pass may run again (`repair=True`) after a crash or an
engine error stopped it: the broker message of the task that ended is acked only once its
follow-ups are done, and comes back for repair otherwise. A task that was replaced
(core/replacement.py) has one follow-up of its own before it ends: starting its replacement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2

from ..config import Limits
from .confirmed import publish_confirmed, take_over
from .publisher import Publisher
from .records import FAILED_STATES, TaskStates, new_record
from .replacement import Replacements, waits_for_replacement
from .signatures import error_value, filled, with_leading_arg
from .store import TaskStore
from .workflow import WorkflowEngine


class FollowUps:
    """Runs the follow-ups of ended tasks. It builds the workflow engine it drives and hands it
    itself (the engine's FollowUpHooks): each needs the other, and both are complete once built."""

    def __init__(
        self, store: TaskStore, publisher: Publisher, default_queue: str, limits: Limits | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.default_queue = default_queue
        self.workflow = WorkflowEngine(store, publisher, followups=self)
        self.replacements = Replacements(store, self.workflow, default_queue, limits or Limits(), self.after_terminal)

    async def after_terminal(self, records: Sequence[records_pb2.TaskRecord], repair: bool = False) -> None:
        for record in records:
            if waits_for_replacement(record):
                await self.replacements.start(record, repair)
                continue
            result = record.result
            if result.state == TaskStates.TASK_STATE_SUCCESS and result.signature.on_success:
                await self.fire_callbacks(
                    f"{result.task_id}.ok", list(result.signature.on_success), result.result, result.workflow_id,
                    result.signature.headers, repair,
                )
            elif result.state in FAILED_STATES and result.signature.on_error:
                await self.fire_callbacks(
                    f"{result.task_id}.err", list(result.signature.on_error), result.error, result.workflow_id,
                    result.signature.headers, repair, failed_task_id=result.task_id,
                )
            if record.node_id:
                await self.workflow.on_task_terminal(record, repair)

    async def replacement_done(
        self, plan: records_pb2.WorkflowPlan, outcome: records_pb2.NodeOutcome, repair: bool,
    ) -> None:
        await self.replacements.finish(plan, outcome, repair)

    async def fire_callbacks(
        self,
        id_prefix: str,
        signatures: Sequence[task_pb2.Signature],
        argument: task_pb2.Value | result_pb2.TaskError,
        workflow_id: str,
        headers: Mapping[str, str] | None = None,
        repair: bool = False,
        *,
        failed_task_id: str = "",
    ) -> None:
        """Submit callbacks under ids derived from their cause, so a repeat fires none twice.
        An error reaches them as a JSON object naming the task that failed (`failed_task_id`).
        They inherit the cause's trace context (`headers`) and so join its trace. On repair,
        callbacks created by an earlier pass but not confirmed as published are sent again."""
        value = argument if isinstance(argument, task_pb2.Value) else error_value(argument, failed_task_id)
        records = [
            new_record(
                with_leading_arg(
                    filled(sig, self.default_queue, task_id=f"{id_prefix}{i}", inherit_headers=headers), value
                ),
                workflow_id=workflow_id,
            )
            for i, sig in enumerate(signatures)
        ]
        existing = set(await self.store.create(records))
        fresh = [r for r in records if r.result.task_id not in existing]
        if repair and existing:
            earlier = await self.store.load(list(existing))
            fresh.extend(await take_over(self.store, [found.record for found in earlier.values()]))
        await publish_confirmed(self.store, self.publisher, fresh, workflow_id)
