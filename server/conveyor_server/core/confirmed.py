"""Publishing follow-ups (workflow steps, callbacks) so that repair can tell what went out.

A follow-up is claimed once by an atomic transition on its own record (`enqueued`), then
published, then confirmed (`published`). Repair after a crash or an engine error republishes
what is claimed but unconfirmed, and never what is confirmed, so a callback cannot be sent
twice by the repair path itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.internal.v1 import records_pb2

from .publisher import Publication, Publisher
from .records import S
from .store import TaskStore


def unconfirmed(record: records_pb2.TaskRecord) -> bool:
    """Claimed for publishing, possibly never published: what repair sends again."""
    return record.enqueued and not record.published and record.result.state == S.TASK_STATE_PENDING


async def publish_confirmed(
    store: TaskStore, publisher: Publisher, records: Sequence[records_pb2.TaskRecord], workflow_id: str
) -> None:
    if not records:
        return
    await publisher.publish([Publication(r.result.signature, 1, workflow_id) for r in records])

    def confirm(_: str, record: records_pb2.TaskRecord) -> bool:
        if record.published or record.result.state != S.TASK_STATE_PENDING:
            return False  # a task already received was evidently published
        record.published = True
        return True

    await store.update([r.result.task_id for r in records], confirm)
