"""A clock a test sets by hand, for `Core.build(..., clock=manual.clock)` and the components
that take a `Clock`: time moves only when the test says, so no test sleeps to let it pass."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor_server.core.clock import Clock


@dataclass
class ManualClock:
    # Round values: a wall time plus a round delay is exact in a float and in a Timestamp.
    wall: float = 1_700_000_000.0
    monotonic: float = 1_000.0

    def advance(self, seconds: float) -> None:
        """Both clocks move on by `seconds`."""
        self.wall += seconds
        self.monotonic += seconds

    @property
    def clock(self) -> Clock:
        """A Clock reading this one's current times."""
        return Clock(wall=lambda: self.wall, monotonic=lambda: self.monotonic)
