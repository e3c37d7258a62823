"""The reconciler: keeps the outbox's promises that their writer did not confirm.

Every replica runs one. It looks at outbox entries older than a grace (their writer died, or
an engine failed under it), takes each one for this grace period with an atomic claim (so
replicas do not repeat each other), does the promised work idempotently, and removes the entry.
Publishing again a task its writer did publish before dying makes a second message; dispatch
drops a second copy of a task already running, and a task already ended is never run again.

Each pass then runs the repair of lost messages (core/repair.py): live tasks published long
ago that show no sign of life are published again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from conveyor.internal.v1 import records_pb2

from .followups import FollowUps
from .outbox import FOLLOW_UPS, Outbox
from .publisher import Publication, Publisher
from .records import TaskStates, is_terminal
from .repair import Repairer
from .store import TaskStore
from .workflow import WorkflowEngine

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self, outbox: Outbox, store: TaskStore, publisher: Publisher, workflow: WorkflowEngine,
        followups: FollowUps, grace_seconds: float, repairer: Repairer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.publisher = publisher
        self.workflow = workflow
        self.followups = followups
        self.grace_seconds = grace_seconds
        self.repairer = repairer
        self.clock = clock

    async def run(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.reconcile_once()
            except Exception as exc:
                log.warning("reconciling the outbox failed (%s: %s); will retry", type(exc).__name__, exc)
            if self.repairer is None:
                continue
            try:
                await self.repairer.repair_due()
            except Exception as exc:
                log.warning("repairing lost messages failed (%s: %s); will retry", type(exc).__name__, exc)

    async def reconcile_once(self) -> int:
        """Keep every overdue promise; returns how many entries were settled."""
        at = self.clock()
        # An entry is taken by one replica per period; one whose keeping failed is tried again
        # in the next period (by any replica).
        period = int(at // max(self.grace_seconds / 4, 1.0))
        settled = 0
        for entry_id, entry in await self.outbox.entries(self.grace_seconds, at):
            if not await self.store.backend.claim(f"reconcile:{entry_id}:{period}"):
                continue  # another replica has it for this period
            try:
                await self._keep(entry_id, entry)
                await self.outbox.remove(entry_id)
            except Exception as exc:
                log.warning("outbox entry %s: %s: %s; will retry", entry_id, type(exc).__name__, exc)
                continue
            settled += 1
        if settled:
            log.info("reconciler kept %d outbox promises", settled)
        return settled

    async def _keep(self, entry_id: str, entry: records_pb2.OutboxEntry) -> None:
        loaded = await self.store.load(list(entry.task_ids))
        if entry.kind == FOLLOW_UPS:
            ended = [found.record for found in loaded.values() if is_terminal(found.record)]
            if ended:
                await self.followups.after_terminal(ended, repair=True)
            return
        pending = [
            found.record for found in loaded.values()
            if found.record.outbox_id == entry_id and found.record.result.state == TaskStates.TASK_STATE_PENDING
        ]
        if pending:
            await self.publisher.publish([Publication(r.result.signature) for r in pending])
        for workflow_id in entry.workflow_ids:
            plan = await self.store.plan(workflow_id)
            if plan is not None:
                await self.workflow.start_workflow(plan, repair=True)
