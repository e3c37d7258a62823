"""Admission control (core/admission.py), details the admission tests leave open: each queue is
measured on its own (its own reading, its own cached value), and a shared read that fails after
every caller gave up is not reported by the event loop as an exception nobody retrieved."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import QueueLimit
from conveyor_server.core.admission import Admission, Recent
from conveyor_server.core.errors import ResourceExhausted
from conveyor_server.core.queue_ages import QueueAges
from tests.unit.test_admission import SUBMITTED, Clock, Index, broker, index, waiting

__all__ = ["broker", "index"]  # fixtures used by the tests below


async def test_a_queues_age_is_measured_on_that_queue_alone(index: Index, broker: MemoryBroker) -> None:
    behind, fresh, unlimited = index.queue, f"{index.queue}-fresh", f"{index.queue}-other"
    await index.add(waiting(behind, "old"), waiting(unlimited, "older", at=SUBMITTED - 100))
    admission = Admission(broker, {behind: QueueLimit(max_age_seconds=15), fresh: QueueLimit(max_age_seconds=15)},
                          QueueAges(index.indexer, Clock(SUBMITTED + 20)), clock=Clock(0.0))
    with pytest.raises(ResourceExhausted, match=r"has a task ready for 20\.0 s"):
        await admission.admit([behind])
    # Read at the same moment, within the cache's life: the fresh queue has its own value, and
    # the old tasks of other queues do not count against it.
    await admission.admit([fresh])


async def test_a_queues_depth_is_measured_on_that_queue_alone(broker: MemoryBroker) -> None:
    await broker.publish("full", [OutgoingMessage(f"m{n}", b"x") for n in range(3)])
    admission = Admission(broker, {"full": QueueLimit(max_depth=3), "empty": QueueLimit(max_depth=3)},
                          clock=Clock(1_000.0))
    with pytest.raises(ResourceExhausted, match="holds 3 ready tasks"):
        await admission.admit(["full"])
    await admission.admit(["empty"])  # at the same moment: its own depth, 0, not full's cached 3


async def abandoned_read(recent: Recent[int], read: Callable[[], Awaitable[int]], release: asyncio.Event) -> None:
    """A caller starts the read, gives up while it runs, then the read ends."""
    caller = asyncio.create_task(recent.get("q", read))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    del caller
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()


async def test_a_shared_read_that_fails_after_its_callers_gave_up_is_not_reported_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        recent: Recent[int] = Recent(0.5, Clock(0.0))
        release = asyncio.Event()

        async def broken() -> int:
            await release.wait()
            raise ConnectionError("backend away")

        async def fine() -> int:
            await release.wait()
            return 7

        await abandoned_read(recent, broken, release)
        assert await recent.get("q", fine) == 7  # the failure was not kept: the next caller reads again
        await asyncio.sleep(0)
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(None)
