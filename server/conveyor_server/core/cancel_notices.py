"""Cancels reach the workers of every replica at once, not at their next heartbeat.

A cancel stores CANCELLED, then tells the workers holding the task to stop it (a prefetched
task is dropped before it starts). This replica tells its own workers itself; the ids it does
not hold go into one shared notice record, which every replica watches (Backend.watch: Redis
pub/sub, a MongoDB change stream, polling for memcached) and on a change sends CancelTasks to
those of its workers that hold one of them.

The notices are a fast path. A replica that misses one (it was cut off from the backend, or
the notice was pruned before it read it) still finds the CANCELLED record at the worker's
next heartbeat. Acting on a notice twice, or late, is harmless: it names ended tasks, and an
ended task is never handed out again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..backends.base import Backend
from ..backoff import Backoff
from .versioned import Stored, VersionedRecords

log = logging.getLogger(__name__)

NOTICES_KEY = "cancel-notices"
# Long enough for every replica to read a notice through a short backend hiccup; beyond
# that the heartbeats carry the cancel.
KEEP_SECONDS = 60.0
# A bound on the record's size whatever the rate of cancels (the oldest notices go first).
MAX_IDS = 10_000

# Sends CancelTasks to this replica's workers holding any of the ids; returns the ids held.
StopHeld = Callable[[list[str]], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Notice:
    seq: int
    at: float
    task_ids: tuple[str, ...]


def parse(data: bytes) -> list[Notice]:
    try:
        return [Notice(int(n["seq"]), float(n["at"]), tuple(map(str, n["ids"]))) for n in json.loads(data)]
    except (TypeError, KeyError) as exc:
        raise ValueError(f"not a list of cancel notices: {exc}") from exc


def serialize(notices: list[Notice]) -> bytes:
    return json.dumps([{"seq": n.seq, "at": n.at, "ids": list(n.task_ids)} for n in notices]).encode()


def appended(notices: list[Notice], task_ids: Sequence[str], now: float) -> list[Notice]:
    """`notices` with one for `task_ids` added, less those older than KEEP_SECONDS and the
    oldest beyond MAX_IDS ids in all."""
    top = max((n.seq for n in notices), default=0)
    kept = [n for n in notices if now - n.at < KEEP_SECONDS] + [Notice(top + 1, now, tuple(task_ids))]
    while len(kept) > 1 and sum(len(n.task_ids) for n in kept) > MAX_IDS:
        kept.pop(0)
    return kept


class CancelNotices:
    def __init__(
        self, backend: Backend, stop_held: StopHeld, clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.stop_held = stop_held
        self._clock = clock
        self._records = VersionedRecords(backend, parse, serialize, keep=True)
        # The highest notice acted on; a record that restarts below it (it was deleted) is read whole.
        self._seen = 0

    async def stop(self, task_ids: list[str]) -> None:
        """Stop these running (or prefetched) tasks wherever a worker holds them."""
        held = set(await self.stop_held(task_ids))
        elsewhere = [t for t in task_ids if t not in held]
        if not elsewhere:
            return
        try:
            await self._records.change(NOTICES_KEY, lambda read: appended(
                read.record if read is not None else [], elsewhere, self._clock()))
        except Exception as exc:  # the cancel is stored: the heartbeats still carry it
            log.warning("telling other replicas of %d cancelled tasks failed (%s: %s); their workers learn "
                        "of it at their next heartbeat", len(elsewhere), type(exc).__name__, exc)

    async def run(self) -> None:
        """Act on the notices other replicas write, until cancelled."""
        backoff = Backoff()
        while True:
            try:
                async for _ in self.backend.watch([NOTICES_KEY]):
                    await self._act(await self._records.load([NOTICES_KEY]))
                    backoff.reset()
                return  # the backend closed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading cancel notices failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(backoff.next())

    async def _act(self, loaded: dict[str, Stored[list[Notice]]]) -> None:
        found = loaded.get(NOTICES_KEY)
        notices = found.record if found is not None else []
        top = max((n.seq for n in notices), default=0)
        if top < self._seen:
            self._seen = 0
        fresh = [t for n in notices if n.seq > self._seen for t in n.task_ids]
        if fresh:
            await self.stop_held(list(dict.fromkeys(fresh)))
        self._seen = top
