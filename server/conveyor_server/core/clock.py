"""The server's two clocks, passed in rather than read from `time`, so that a test sets the
time instead of sleeping or patching modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.values import set_seconds, timestamp_now


@dataclass(frozen=True)
class Clock:
    """What the core reads the time from: SYSTEM_CLOCK in production, one a test sets in tests."""

    # Seconds since the epoch: what records keep (transition times, ETAs, retry_at, expiry).
    wall: Callable[[], float] = time.time
    # Seconds on a clock that never steps back: intervals (leases, heartbeats, deadlines).
    monotonic: Callable[[], float] = time.monotonic

    def timestamp(self) -> Timestamp:
        """The wall time as a Timestamp."""
        stamp = Timestamp()
        set_seconds(stamp, self.wall())
        return stamp


@dataclass(frozen=True)
class _SystemClock(Clock):
    """The real clocks. Its timestamps come from time.time_ns(): whole nanoseconds, as the core
    stamped records before the clock was passed in, and half the cost of going through a float
    (records are stamped several times per task)."""

    def timestamp(self) -> Timestamp:
        return timestamp_now()


SYSTEM_CLOCK: Clock = _SystemClock()
