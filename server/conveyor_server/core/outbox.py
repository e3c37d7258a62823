"""The outbox: durable promises of work that must still happen (publishes, follow-ups).

An entry is written (never expiring) before the records it covers, and removed once the work
is confirmed. Whatever a crash or an engine error leaves behind is found by the reconciler
(`core/reconciler.py`) on any replica and done again, idempotently. Entries are members of one
backend group, so listing them needs no scan of the records; the group holds only work in
progress, which keeps it small.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import TypeAlias

from conveyor.internal.v1 import records_pb2
from conveyor.values import seconds_of

from ..backends.base import Backend, GroupMember
from .clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

OUTBOX_GROUP = "outbox"
Kind: TypeAlias = records_pb2.OutboxKind.ValueType
PUBLISH = records_pb2.OUTBOX_KIND_PUBLISH
FOLLOW_UPS = records_pb2.OUTBOX_KIND_FOLLOW_UPS
# Confirmed entries are removed together, this long after the first of them: one engine call
# for every submit of the moment instead of one each (at light load it was a third of a
# submit's calls). Far below the reconciler's grace, so a lingering entry is never repeated.
CONFIRM_LINGER_SECONDS = 0.1


def new_entry_id() -> str:
    return f"ob-{uuid.uuid4().hex}"


class Outbox:
    def __init__(self, backend: Backend, clock: Clock = SYSTEM_CLOCK) -> None:
        self.backend = backend
        self.clock = clock
        # Confirmations are removed in the background: a confirmed entry that lingers costs
        # at most one idempotent repeat, while the caller's answer does not wait for it.
        self._confirmed: list[str] = []
        self._linger: asyncio.TimerHandle | None = None
        self._removals: set[asyncio.Task[None]] = set()

    async def promise(
        self, kind: Kind, task_ids: Sequence[str] = (), workflow_ids: Sequence[str] = (), entry_id: str = ""
    ) -> str:
        """Durably record the promise; returns the entry id to confirm it with."""
        entry = self.entry(kind, task_ids, workflow_ids, entry_id or new_entry_id())
        await self.write(entry)
        return entry.name

    async def write(self, entry: GroupMember) -> None:
        """Store an entry made by entry()."""
        await self.backend.add_member(entry.group, entry.name, entry.payload, entry.keep)

    def entry(self, kind: Kind, task_ids: Sequence[str], workflow_ids: Sequence[str], entry_id: str) -> GroupMember:
        """The promise as the outbox member to store (kept until confirmed), for a caller that
        writes it together with what it covers (Backend.insert_after)."""
        entry = records_pb2.OutboxEntry(
            kind=kind, task_ids=task_ids, workflow_ids=workflow_ids, created_at=self.clock.timestamp()
        )
        return GroupMember(OUTBOX_GROUP, entry_id, entry.SerializeToString(), keep=True)

    def confirm(self, entry_id: str) -> None:
        """The promised work is done: forget the entry (in the background, with the others
        confirmed within CONFIRM_LINGER_SECONDS)."""
        self._confirmed.append(entry_id)
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(CONFIRM_LINGER_SECONDS, self._remove_confirmed)

    async def remove(self, entry_id: str) -> None:
        await self.backend.remove_member(OUTBOX_GROUP, entry_id)

    def _remove_confirmed(self) -> None:
        self._linger = None
        confirmed, self._confirmed = self._confirmed, []
        if confirmed:
            task = asyncio.create_task(self._remove(confirmed))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    async def _remove(self, entry_ids: list[str]) -> None:
        try:
            await self.backend.remove_members(OUTBOX_GROUP, entry_ids)
        except Exception:  # the reconciler finds them and repeats the (done) work harmlessly
            log.warning("could not remove %d confirmed outbox entries (%s); the reconciler will",
                        len(entry_ids), entry_ids[0])

    async def entries(self, older_than: float, at: float) -> list[tuple[str, records_pb2.OutboxEntry]]:
        """Entries created more than `older_than` seconds before `at` (epoch seconds)."""
        found: list[tuple[str, records_pb2.OutboxEntry]] = []
        for entry_id, payload in (await self.backend.members(OUTBOX_GROUP)).items():
            entry = records_pb2.OutboxEntry()
            entry.ParseFromString(payload)
            created = seconds_of(entry.created_at)
            if at - created >= older_than:
                found.append((entry_id, entry))
        return found

    async def drain(self) -> None:
        """Remove the confirmed entries now and wait for it (at shutdown)."""
        if self._linger is not None:
            self._linger.cancel()
        self._remove_confirmed()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
