"""Retry decisions: whether another attempt runs, and after how long."""

from __future__ import annotations

import random

from conveyor.v1 import task_pb2
from conveyor.values import seconds_of

DEFAULT_INITIAL_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 3600.0


# A Duration in seconds, under the name the outcome recorder and the tests import from here.
seconds = seconds_of


def attempts_allowed(policy: task_pb2.RetryPolicy) -> int:
    """Total attempts, the first included (0 or 1 both mean a single attempt)."""
    return max(policy.max_attempts, 1)


def base_delay(policy: task_pb2.RetryPolicy, attempt: int) -> float:
    """Delay before attempt `attempt + 1`, without jitter; `attempt` counts from 1."""
    initial = seconds(policy.initial) or DEFAULT_INITIAL_SECONDS
    cap = seconds(policy.max) or DEFAULT_MAX_SECONDS
    kind = policy.backoff or task_pb2.BACKOFF_KIND_EXPONENTIAL
    if kind == task_pb2.BACKOFF_KIND_FIXED:
        delay = initial
    elif kind == task_pb2.BACKOFF_KIND_FIBONACCI:
        previous, current = 0, 1
        for _ in range(attempt - 1):
            previous, current = current, previous + current
        delay = initial * current
    else:
        delay = initial * 2 ** min(attempt - 1, 62)
    return min(delay, cap)


def next_delay(policy: task_pb2.RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Delay with jitter: uniformly within ±jitter of the base delay, never negative."""
    delay = base_delay(policy, attempt)
    if policy.jitter > 0:
        spread = delay * policy.jitter
        delay += (rng or random).uniform(-spread, spread)
    return max(delay, 0.0)
