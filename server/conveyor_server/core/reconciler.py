"""The reconciler: keeps the outbox's promises that their writer did not confirm.

Every replica runs one. It looks at outbox entries older than a grace (their writer died, or
an engine failed under it), takes each one for this grace period with an atomic claim (so
replicas do not repeat each other), does the promised work idempotently, and removes the entry.
Publishing again a task its writer did publish before dying makes a second message; dispatch
drops a second copy of a task already running, and a task already ended is never run again.

While an engine is out of reach the passes come quickly (a jittered backoff capped at
RETRY_MAX_SECONDS, not the interval), so what was accepted during an outage goes out within a
fraction of a second of the engine's return; each such pass stops at the first entry the engine
refuses (the rest would be refused too) and tries the entries that failed last.

The repair of lost messages (core/repair.py) runs once per interval in a loop of its own: live
tasks published long ago that show no sign of life are published again. Its passes can take
seconds on an engine that has just come back, and the promises must not wait behind them
(replicas already repair and keep promises side by side, so running both at once is nothing new).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence

from conveyor.internal.v1 import records_pb2

from ..backoff import Backoff
from ..engine_errors import is_transient
from .followups import FollowUps
from .outbox import FOLLOW_UPS, Outbox
from .publisher import Publication, Publisher
from .records import TaskStates, is_terminal
from .repair import Repairer
from .store import TaskStore
from .workflow import WorkflowEngine

log = logging.getLogger(__name__)
# While an engine refuses the outbox's promises, the next pass comes after a jittered backoff from
# the first delay up to the cap: the cap bounds how long after the engine's return the work
# accepted meanwhile goes out (the interval, seconds long, did).
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 0.5
# Passes refused in a row between two warnings about it.
WARN_EVERY_PASSES = 20


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
        # Passes in a row that an engine refused (0: the engines answer; passes come every interval).
        self.refused_passes = 0
        # Entries this replica claimed, and the period of the claim, that it could not keep yet.
        self._held: dict[str, int] = {}
        # Entries whose keeping failed, by when (a counter): they are tried after the others.
        self._failed: dict[str, int] = {}
        self._failures = itertools.count()

    async def run(self, interval_seconds: float) -> None:
        """Keep promises and repair lost messages, each in a loop of its own: a repair pass waits
        on the broker as long as it must (hundreds of records to judge and republish on an engine
        that has just come back), and the promises accepted during an outage must not wait for it."""
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._keep_promises(interval_seconds))
            if self.repairer is not None:
                loops.create_task(self._repair_lost_messages(self.repairer, interval_seconds))

    async def _keep_promises(self, interval_seconds: float) -> None:
        retry = Backoff(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
        while True:
            await asyncio.sleep(retry.next() if self.refused_passes else interval_seconds)
            try:
                await self.reconcile_once()
            except Exception as exc:
                if is_transient(exc):
                    self._refused(exc, "reading the outbox")
                else:
                    log.warning("reconciling the outbox failed (%s: %s); will retry", type(exc).__name__, exc)
            if not self.refused_passes:
                retry.reset()

    @staticmethod
    async def _repair_lost_messages(repairer: Repairer, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await repairer.repair_due()
            except Exception as exc:
                log.warning("repairing lost messages failed (%s: %s); will retry", type(exc).__name__, exc)

    async def reconcile_once(self) -> int:
        """Keep every overdue promise; returns how many entries were settled. Stops at the first
        entry an engine refuses: the next pass, soon, tries it after the others."""
        at = self.clock()
        # An entry is taken by one replica per period; the replica that took it tries it again
        # in that period (the quick passes of an outage) and any replica in the next.
        period = int(at // max(self.grace_seconds / 4, 1.0))
        self._held = {entry_id: held for entry_id, held in self._held.items() if held == period}
        entries = await self.outbox.entries(self.grace_seconds, at)
        settled = 0
        refused: BaseException | None = None
        for entry_id, entry in self._in_turn(entries):
            if self._held.get(entry_id) != period:
                if not await self.store.backend.claim(f"reconcile:{entry_id}:{period}"):
                    continue  # another replica has it for this period
                self._held[entry_id] = period
            try:
                await self._keep(entry_id, entry)
                await self.outbox.remove(entry_id)
            except Exception as exc:
                self._failed[entry_id] = next(self._failures)
                if is_transient(exc):
                    refused = exc
                    break
                log.warning("outbox entry %s: %s: %s; will retry", entry_id, type(exc).__name__, exc)
                continue
            self._held.pop(entry_id, None)
            self._failed.pop(entry_id, None)
            settled += 1
        if refused is not None:
            self._refused(refused, f"keeping outbox promises ({len(entries) - settled} waiting)")
        else:
            self._reached(settled)
        if settled:
            log.info("reconciler kept %d outbox promises", settled)
        return settled

    def _in_turn(
        self, entries: Sequence[tuple[str, records_pb2.OutboxEntry]]
    ) -> list[tuple[str, records_pb2.OutboxEntry]]:
        """Entries that never failed first, then those that failed longest ago: an entry an engine
        keeps refusing does not hold the others up."""
        listed = {entry_id for entry_id, _ in entries}
        self._failed = {entry_id: turn for entry_id, turn in self._failed.items() if entry_id in listed}
        return sorted(entries, key=lambda item: self._failed.get(item[0], -1))

    def _refused(self, exc: BaseException, doing: str) -> None:
        """An engine refused this pass: the next one comes soon; warn on the first and now and then."""
        self.refused_passes += 1
        if self.refused_passes == 1 or self.refused_passes % WARN_EVERY_PASSES == 0:
            log.warning("reconciler: %s failed, an engine is unreachable (%s: %s); passes %d in a row; "
                        "retrying every %g s at most", doing, type(exc).__name__, exc, self.refused_passes,
                        RETRY_MAX_SECONDS)

    def _reached(self, settled: int) -> None:
        if self.refused_passes:
            log.warning("reconciler: the engines answer again after %d refused passes; kept %d promises",
                        self.refused_passes, settled)
        self.refused_passes = 0

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
