"""Rate limit specs: "100/s", "10/m", "1000/h" parsed into a per-second rate and a burst."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from ..errors import InvalidArgument
from ..validation import TASK_NAME

_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")
_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
# A rate past this is a typo, not a limit.
MAX_PER_SECOND = 1e7
# A burst past this could never be spent before it refilled.
MAX_BURST = 10_000_000


class Source(StrEnum):
    """Where a limit comes from: stored through AdminService, or a server's config file."""

    ADMIN = "admin"
    CONFIG = "config"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket on one task name: `per_second` tokens a second, at most `burst` held."""

    name: str
    rate: str
    per_second: float
    burst: int
    per_key: bool = False
    source: Source = Source.ADMIN


def parse_rate(spec: str) -> float:
    """Tasks per second in a spec like "100/s", "10/m" or "1000/h"."""
    found = _SPEC.match(spec.lower())
    unit = _UNITS.get(found.group(2)) if found else None
    if found is None or unit is None:
        raise InvalidArgument(
            f"rate {spec[:40]!r} is not a rate limit: use <count>/<unit> with unit s, m or h, e.g. 100/s, 10/m, 1000/h"
        )
    per_second = float(found.group(1)) / unit
    if not 0 < per_second <= MAX_PER_SECOND or not math.isfinite(per_second):
        raise InvalidArgument(f"rate {spec[:40]!r} must be above 0 and at most {MAX_PER_SECOND:.0f}/s")
    return per_second


def default_burst(per_second: float) -> int:
    """One second's worth of tasks, and at least one."""
    return max(1, math.floor(per_second))


def rate_limit(name: str, spec: str, burst: int = 0, per_key: bool = False, source: Source = Source.ADMIN) -> RateLimit:
    """A checked RateLimit; InvalidArgument names what is wrong. A burst of 0 gets the default."""
    if not TASK_NAME.match(name):
        raise InvalidArgument(f"rate limit name {name[:80]!r}: give the task name (1-200 characters, no whitespace)")
    per_second = parse_rate(spec)
    if not 0 <= burst <= MAX_BURST:
        raise InvalidArgument(f"rate limit burst {burst} must be between 0 (the default) and {MAX_BURST}")
    return RateLimit(name, spec.strip().lower().replace(" ", ""), per_second, burst or default_burst(per_second),
                     per_key, source)
