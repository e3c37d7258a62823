"""Publishing follow-ups (workflow steps, callbacks) so that repair can tell what went out.

A follow-up is claimed once by an atomic transition on its own record (`enqueued`), then
published, then confirmed (`published`). Repair after a crash or an engine error republishes
what is claimed but unconfirmed, and never what is confirmed, so a callback cannot be sent
twice by the repair path itself. A claim younger than CLAIM_GRACE_SECONDS may still be in its
claimer's hands (two repairs of one chord run at once): repair then waits and tries again
later (RepairPending) rather than publish beside the claimer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from conveyor.internal.v1 import records_pb2
from conveyor.values import seconds_of

from .publisher import Publication, Publisher
from .records import TaskStates
from .store import TaskStore

# How long a claimer has to publish and confirm before repair may publish in its place.
CLAIM_GRACE_SECONDS = 3.0


class RepairPending(RuntimeError):
    """A follow-up was claimed moments ago and is not confirmed yet: repair again later."""


def unconfirmed(record: records_pb2.TaskRecord) -> bool:
    """Claimed for publishing, possibly never published."""
    return record.enqueued and not record.published and record.result.state == TaskStates.TASK_STATE_PENDING


def _claimed_for(record: records_pb2.TaskRecord, at: float) -> float:
    return at - seconds_of(record.enqueued_at)


async def take_over(store: TaskStore, records: Iterable[records_pb2.TaskRecord]) -> list[records_pb2.TaskRecord]:
    """The unconfirmed follow-ups that this repair publishes again: those claimed longer than
    the grace ago, each taken over by an atomic re-claim (a fresh `enqueued_at`), so of
    repairs running at once exactly one resends it. Raises RepairPending when a claim is
    younger than the grace: its claimer may still be publishing."""
    at = time.time()
    stale: list[str] = []
    young: list[str] = []
    for record in records:
        if unconfirmed(record):
            (stale if _claimed_for(record, at) >= CLAIM_GRACE_SECONDS else young).append(record.result.task_id)
    if young:
        raise RepairPending(f"follow-ups claimed moments ago, not confirmed yet: {', '.join(young[:5])}")
    if not stale:
        return []

    def reclaim(_: str, record: records_pb2.TaskRecord) -> bool:
        if not unconfirmed(record) or _claimed_for(record, at) < CLAIM_GRACE_SECONDS:
            return False  # confirmed meanwhile, or taken over by a concurrent repair
        record.enqueued_at.GetCurrentTime()
        return True

    return list((await store.update(stale, reclaim)).values())


async def publish_confirmed(
    store: TaskStore, publisher: Publisher, records: Sequence[records_pb2.TaskRecord], workflow_id: str
) -> None:
    if not records:
        return
    await publisher.publish([Publication(r.result.signature, 1, workflow_id) for r in records])

    def confirm(_: str, record: records_pb2.TaskRecord) -> bool:
        if record.published or record.result.state != TaskStates.TASK_STATE_PENDING:
            return False  # a task already received was evidently published
        record.published = True
        return True

    await store.update([r.result.task_id for r in records], confirm)
