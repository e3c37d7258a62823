"""The server's two clocks, passed in rather than read from `time`, so that a test sets the
time instead of sleeping or patching modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.values import set_seconds


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


SYSTEM_CLOCK = Clock()
