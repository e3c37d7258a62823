"""Per-caller token buckets for submissions: RESOURCE_EXHAUSTED past the configured rate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.errors import ResourceExhausted

# Buckets idle this long are forgotten, so many short-lived peers cannot grow the table.
IDLE_SECONDS = 600.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class SubmitRateLimiter:
    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.rate = rate_per_second
        self.burst = max(burst, 1)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, caller: str, tasks: int) -> None:
        """Spend `tasks` from the caller's bucket or refuse the whole submission."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
            self._forget_idle(now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if tasks > bucket.tokens:
            wait = (tasks - bucket.tokens) / self.rate
            raise ResourceExhausted(
                f"submit rate limit for {caller!r} is {self.rate:g} tasks/s (burst {self.burst}); "
                f"{tasks} tasks would exceed it, retry in {wait:.2f} s"
            )
        bucket.tokens -= tasks

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) > 10_000:
            for key in [k for k, b in self._buckets.items() if now - b.updated > IDLE_SECONDS]:
                del self._buckets[key]
