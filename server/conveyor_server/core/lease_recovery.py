"""The lease recoverer: brings back tasks whose holder vanished (a dead server replica, a hung
worker) by asking the broker, every few seconds, to return expired leases to their queues.

Engines whose server does this by itself (SQS visibility, AMQP connection loss) answer 0; the
others (memory, SQLite, Redis) rely on this loop. Every replica runs it: the Broker protocol
makes recover_expired() safe to call from many at once.
"""

from __future__ import annotations

import asyncio
import logging

from ..brokers.base import Broker

log = logging.getLogger(__name__)


class LeaseRecoverer:
    def __init__(self, broker: Broker, interval_seconds: float) -> None:
        self.broker = broker
        self.interval_seconds = interval_seconds

    async def recover_once(self) -> int:
        """Return expired leases to their queues now; how many came back."""
        recovered = await self.broker.recover_expired()
        if recovered:
            log.info("returned %d tasks with expired leases to their queues", recovered)
        return recovered

    async def run(self) -> None:
        """Recover every `interval_seconds` until cancelled; an engine error only skips a round."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.recover_once()
            except Exception:
                log.exception("recovering expired leases failed; will retry")
