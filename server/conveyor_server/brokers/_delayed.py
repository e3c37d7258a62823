"""Ids of the delayed messages this process published, per queue, with their due times.

Engines whose delay queues cannot be read (AMQP, SQS) keep these so that stats() can count
delayed messages and purge() can name the ones it drops. Entries past their due time are
pruned when the list has doubled since the last prune, so a busy queue stays bounded.
"""

from __future__ import annotations

import time

PRUNE_AT_LEAST = 1024


def now_ms() -> int:
    return int(time.time() * 1000)


class PublishedDelays:
    def __init__(self) -> None:
        self._pending: dict[str, list[tuple[int, str]]] = {}
        self._prune_at: dict[str, int] = {}

    def track(self, queue: str, message_id: str, due_ms: int) -> None:
        pending = self._pending.setdefault(queue, [])
        if len(pending) >= self._prune_at.get(queue, PRUNE_AT_LEAST):
            now = now_ms()
            pending[:] = [item for item in pending if item[0] > now]
            self._prune_at[queue] = max(PRUNE_AT_LEAST, 2 * len(pending))
        pending.append((due_ms, message_id))

    def not_due(self, queue: str) -> list[str]:
        """Ids of this queue's tracked messages that are not due yet."""
        now = now_ms()
        return [message_id for due_ms, message_id in self._pending.get(queue, []) if due_ms > now]

    def take(self, queue: str) -> list[str]:
        """Like not_due(), and forget the queue's entries (a purge dropped them)."""
        delayed = self.not_due(queue)
        self._pending.pop(queue, None)
        return delayed
