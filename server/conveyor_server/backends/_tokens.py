"""Token-bucket arithmetic for `Backend.take_tokens`, shared by the engines that compute it in
Python (memory, SQLite, MongoDB, Memcached); the Redis engine runs the same steps in Lua.

A bucket holds at most `burst` tokens and gains `rate_per_second` of them per second; a bucket
never seen, or idle long enough to be full again, is full. A take grants whole tokens only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Float noise must not turn 3 tokens into 2.999999 and so refuse the third.
_EPSILON = 1e-9
# The memory engine forgets full buckets once it holds this many.
_MAX_IDLE_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Taken:
    granted: int
    # Tokens left in the bucket after the take (a fraction of one, when it ran dry).
    left: float
    # Seconds until the bucket holds a whole token again (0 while one is left).
    wait: float


def check_bucket(rate_per_second: float, burst: float, wanted: int) -> None:
    if not (math.isfinite(rate_per_second) and rate_per_second > 0):
        raise ValueError(f"a token bucket needs a positive rate, got {rate_per_second!r}")
    if not (math.isfinite(burst) and burst >= 1):
        raise ValueError(f"a token bucket needs a burst of at least 1 token, got {burst!r}")
    if wanted < 0:
        raise ValueError(f"cannot take {wanted} tokens")


def refill(tokens: float, updated: float, now: float, rate_per_second: float, burst: float) -> float:
    """Tokens in a bucket last left with `tokens` at `updated`, as of `now`. A clock that went
    back (another replica's, a step of NTP) counts as no time passed."""
    return min(burst, tokens + max(0.0, now - updated) * rate_per_second)


def take(tokens: float, wanted: int, rate_per_second: float) -> Taken:
    granted = max(0, min(wanted, math.floor(tokens + _EPSILON)))
    left = tokens - granted
    wait = 0.0 if left + _EPSILON >= 1 else (1 - left) / rate_per_second
    return Taken(granted, left, wait)


def full_after(rate_per_second: float, burst: float) -> float:
    """Seconds after which an idle bucket is full again, so an engine may forget it."""
    return burst / rate_per_second + 1.0


class TokenBuckets:
    """The memory engine's buckets, on an injectable clock (seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # bucket -> (tokens, when they were counted, when the bucket is full again)
        self._buckets: dict[str, tuple[float, float, float]] = {}

    def take(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        check_bucket(rate_per_second, burst, wanted)
        now = self.clock()
        found = self._buckets.get(bucket)
        tokens = burst if found is None else refill(found[0], found[1], now, rate_per_second, burst)
        taken = take(tokens, wanted, rate_per_second)
        self._buckets[bucket] = (taken.left, now, now + full_after(rate_per_second, burst))
        if len(self._buckets) > _MAX_IDLE_BUCKETS:
            for name in [name for name, (_, _, full) in self._buckets.items() if full <= now]:
                del self._buckets[name]
        return taken.granted, taken.wait
