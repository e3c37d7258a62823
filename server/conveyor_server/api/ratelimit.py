"""Per-caller token buckets for submissions: RESOURCE_EXHAUSTED past the configured rate.

A submission is charged one token per task it holds: a workflow's every task (chain steps,
group and chord members, callbacks), and each task of a batch; so a rate of 5/s admits five
tasks a second, not five calls of a thousand-member group each.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from conveyor.v1 import task_service_pb2

from ..core.canvas.map import chunk_count
from ..core.canvas.signatures import placed_signatures
from ..core.errors import ResourceExhausted

# Buckets idle this long are forgotten, so many short-lived peers cannot grow the table.
IDLE_SECONDS = 600.0


def tasks_in(requests: Iterable[task_service_pb2.SubmitRequest]) -> int:
    """How many tasks these submissions hold: every signature in them (callbacks and links too),
    a map's task once per chunk."""
    return sum(
        1 if placed.map is None else chunk_count(placed.map)
        for request in requests
        for placed in placed_signatures(request)
    )


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class SubmitRateLimiter:
    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.rate = rate_per_second
        self.burst = max(burst, 1)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        """False when no rate is set: callers skip counting tasks (a walk of every request)."""
        return self.rate > 0

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
            if tasks > self.burst:
                raise ResourceExhausted(
                    f"submit rate limit for {caller!r} is {self.rate:g} tasks/s (burst {self.burst}); a submission "
                    f"of {tasks} tasks can never fit: split it into parts of at most {self.burst} tasks",
                    reason="SUBMISSION_TOO_LARGE", metadata={"caller": caller, "burst": str(self.burst)},
                )
            wait = (tasks - bucket.tokens) / self.rate
            raise ResourceExhausted(
                f"submit rate limit for {caller!r} is {self.rate:g} tasks/s (burst {self.burst}); "
                f"{tasks} tasks would exceed it, retry in {wait:.2f} s",
                retry_after_seconds=wait, reason="RATE_LIMITED", metadata={"caller": caller},
            )
        bucket.tokens -= tasks

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) > 10_000:
            for key in [k for k, b in self._buckets.items() if now - b.updated > IDLE_SECONDS]:
                del self._buckets[key]
