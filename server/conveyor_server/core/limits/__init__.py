"""Dispatch limits (issue #15): rate limits per task name (and per key) and concurrency keys,
enforced when tasks are handed to workers, with their state in the backend so that every
replica agrees. See policy.py for how a claim passes through them."""

from .concurrency import ConcurrencySlots
from .policy import DispatchLimits
from .rates import RateLimiter
from .spec import RateLimit, Source, parse_rate, rate_limit
from .table import RateLimitTable, configured_limits

__all__ = [
    "ConcurrencySlots",
    "DispatchLimits",
    "RateLimit",
    "RateLimitTable",
    "RateLimiter",
    "Source",
    "configured_limits",
    "parse_rate",
    "rate_limit",
]
