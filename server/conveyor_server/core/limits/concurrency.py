"""Concurrency keys: at most `concurrency_limit` tasks with one `concurrency_key` run at once,
across every replica and worker.

The running tasks of a key are the members of one backend group (`concurrency:<key>`), each
with the wall-clock time it took its slot. A task takes a slot at dispatch: a member already
(a redelivery of a task whose worker was lost: it keeps its slot) or, when the group has room,
by `add_member`, whose exact count tells whether it fit; one that did not fit removes itself
again, so two replicas racing for the last slot never both keep it. The slot is released when
the attempt ends (a result, a retry, a rejection, a time limit), and also when a full group is
found holding members whose task no longer runs (ended, retrying, or back in its queue): a
release that failed, or a task whose last delivery was lost and that failed or was cancelled
meanwhile. A member younger than PRUNE_AFTER_SECONDS is never pruned: its RECEIVED may not be
written yet. A crashed worker's tasks keep their slots until their lease lapses and they run
again, so the limit holds through crashes.

A task that finds no free slot waits in its queue, offered again after a backoff that grows
with its deliveries (never failed for it).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from conveyor.v1 import task_pb2

from ...backends.base import Backend
from ..records import TaskStates
from ..store import TaskStore

log = logging.getLogger(__name__)

# A member this young is kept even if its record does not show it running yet.
PRUNE_AFTER_SECONDS = 10.0
# The wait of a task that found no free slot: doubled per delivery, capped, with jitter.
WAIT_FIRST_SECONDS = 0.1
WAIT_MAX_SECONDS = 2.0
_RUNNING = (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED)


def group_of(key: str) -> str:
    return f"concurrency:{key}"


def is_keyed(signature: task_pb2.Signature) -> bool:
    return bool(signature.concurrency_key) and signature.concurrency_limit > 0


def wait_for_slot(delivery_count: int) -> float:
    """How long a task that found its key's slots taken waits before it is offered again."""
    doublings = min(max(delivery_count - 1, 0), 16)
    ceiling = min(WAIT_FIRST_SECONDS * float(2**doublings), WAIT_MAX_SECONDS)
    return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class Slot:
    """A task holding (or asking for) a slot of its key."""

    task_id: str
    key: str
    limit: int


class ConcurrencySlots:
    def __init__(self, store: TaskStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.backend: Backend = store.backend
        self._clock = clock

    async def acquire(self, slots: Sequence[Slot]) -> list[bool]:
        """Take a slot for each task, in order; one bool per task: whether it got one."""
        known: dict[str, set[str]] = {}  # members of the groups met, as last read or changed here
        granted = []
        for slot in slots:
            group = group_of(slot.key)
            if group not in known:
                known[group] = set(await self.backend.members(group))
            granted.append(await self._acquire(slot, group, known))
        return granted

    async def _acquire(self, slot: Slot, group: str, known: dict[str, set[str]]) -> bool:
        if slot.task_id in known[group]:
            return True
        if len(known[group]) >= slot.limit:
            known[group] = await self._prune(group)
            if len(known[group]) >= slot.limit:
                return False
        count = await self.backend.add_member(group, slot.task_id, repr(self._clock()).encode())
        if count > slot.limit:  # others took the room meanwhile
            await self.backend.remove_member(group, slot.task_id)
            known[group] = set(await self.backend.members(group))
            return False
        known[group].add(slot.task_id)
        return True

    async def release(self, held: Iterable[tuple[str, str]]) -> None:
        """Free the slots of these (task id, key) pairs; a failure is logged (pruning frees them later)."""
        for task_id, key in held:
            try:
                await self.backend.remove_member(group_of(key), task_id)
            except Exception as exc:
                log.warning("releasing the concurrency slot of task %s (key %r) failed: %s: %s; it is freed "
                            "once the key's slots run out", task_id, key, type(exc).__name__, exc)

    async def _prune(self, group: str) -> set[str]:
        """Remove the members whose task no longer runs (if old enough); returns those left."""
        members = await self.backend.members(group)
        horizon = self._clock() - PRUNE_AFTER_SECONDS
        old = [task_id for task_id, since in members.items() if _since(since) < horizon]
        records = await self.store.load(old) if old else {}
        stale = [
            task_id for task_id in old
            if (found := records.get(task_id)) is None or found.record.result.state not in _RUNNING
        ]
        for task_id in stale:
            await self.backend.remove_member(group, task_id)
        if stale:
            log.info("freed %d slots of %s held by tasks no longer running", len(stale), group)
        return set(members) - set(stale)


def _since(payload: bytes) -> float:
    try:
        return float(payload)
    except ValueError:  # not ours: old enough to look at
        return 0.0
