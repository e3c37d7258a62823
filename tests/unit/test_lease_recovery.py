"""core/lease_recovery.py: expired leases come back to their queue, and an engine error only
skips a round of the loop."""

from __future__ import annotations

import asyncio
import contextlib

from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.core.lease_recovery import LeaseRecoverer
from tests.support.processes import until

LEASE_SECONDS = 0.05


class FailsFirst(MemoryBroker):
    """The memory broker whose first recover_expired() call fails (an engine away for a moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.recovered = 0

    async def recover_expired(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("engine unreachable (injected)")
        count = await super().recover_expired()
        self.recovered += count
        return count


async def leased_message(broker: MemoryBroker) -> None:
    await broker.publish("q", [OutgoingMessage("t1", b"body")])
    [delivery] = await broker.fetch("q", 1, LEASE_SECONDS)
    assert delivery.delivery_count == 1


async def test_an_expired_lease_comes_back_with_one_more_delivery() -> None:
    broker = MemoryBroker()
    await leased_message(broker)
    recoverer = LeaseRecoverer(broker, interval_seconds=60)
    assert await recoverer.recover_once() == 0, "the lease is live: nothing comes back yet"
    await asyncio.sleep(LEASE_SECONDS)
    assert await recoverer.recover_once() == 1
    [again] = await broker.fetch("q", 1, LEASE_SECONDS)
    assert (again.message_id, again.delivery_count) == ("t1", 2)


async def test_the_loop_outlives_an_engine_error() -> None:
    broker = FailsFirst()
    await leased_message(broker)
    loop = asyncio.create_task(LeaseRecoverer(broker, interval_seconds=0.01).run())
    try:
        await until(lambda: broker.recovered == 1, 5, "the expired lease back after the failed round")
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    [again] = await broker.fetch("q", 1, LEASE_SECONDS)
    assert again.delivery_count == 2
