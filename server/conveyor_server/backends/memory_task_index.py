"""The memory backend's task index: a dict scanned per query (tests and single-process use)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .task_index import Found, IndexEntry, TaskQuery, ordered


class MemoryTaskIndex:
    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        # task id -> (entry, monotonic expiry; inf while the task is live)
        self._entries: dict[str, tuple[IndexEntry, float]] = {}

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        now = time.monotonic()
        for entry in entries:
            self._entries[entry.task_id] = (entry, now + self._ttl if entry.terminal else math.inf)

    async def find(self, query: TaskQuery) -> Found:
        now = time.monotonic()
        expired = [task_id for task_id, (_, expires) in self._entries.items() if expires <= now]
        for task_id in expired:
            del self._entries[task_id]
        return ordered([entry for entry, _ in self._entries.values() if query.matches(entry)], query)

    async def drop(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._entries.pop(task_id, None)
