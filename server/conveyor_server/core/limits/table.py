"""The rate limits in force: stored in the backend (one record, changed by compare-and-set), so
every replica applies the same ones, plus defaults from this server's config file.

Dispatch reads the limits on every claim, so they are kept in memory (core/refreshed.py): read
again every half `refresh_seconds` in the background (a limit set through another replica
applies here within `refresh_seconds`), and at once after a change made through this replica.
While the backend cannot be read, the last known limits stay in force. A stored limit wins over
the config file's for the same name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ...backends.base import Backend
from ..errors import InvalidArgument, NotFound, Unavailable
from ..refreshed import RefreshedCopy
from ..store import ConflictError
from ..versioned import VersionedRecords
from .spec import RateLimit, Source, rate_limit

log = logging.getLogger(__name__)

RATE_LIMITS_KEY = "limits:rate"
DEFAULT_REFRESH_SECONDS = 1.0
# Conditional writes of the table lost to another replica's change before giving up.
MAX_WRITE_ROUNDS = 20

Stored = dict[str, RateLimit]


def encode(limits: Mapping[str, RateLimit]) -> bytes:
    return json.dumps({
        name: {"rate": limit.rate, "burst": limit.burst, "per_key": limit.per_key} for name, limit in limits.items()
    }, sort_keys=True).encode()


def decode(data: bytes) -> Stored:
    """The stored table; an entry this version cannot read is left out (and logged)."""
    raw: dict[str, Any] = json.loads(data)
    stored: Stored = {}
    for name, entry in raw.items():
        try:
            stored[name] = rate_limit(name, str(entry["rate"]), int(entry.get("burst", 0)), bool(entry.get("per_key")))
        except (InvalidArgument, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring the stored rate limit of %r: %s", name, exc)
    return stored


class RateLimitTable(RefreshedCopy):
    what = "the rate limits"

    def __init__(
        self,
        backend: Backend,
        configured: Iterable[RateLimit] = (),
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh_seconds, clock)
        self.backend = backend
        self._configured: Stored = {limit.name: limit for limit in configured}
        self._stored: Stored = {}
        self._current: Stored = dict(self._configured)

    async def current(self) -> Mapping[str, RateLimit]:
        """The limits in force by task name, as read at most `refresh_seconds` ago (the last
        known ones while the backend cannot be read). Do not change the mapping."""
        await self._fresh()
        return self._current

    async def all(self) -> list[RateLimit]:
        """Every limit in force, read now, by name."""
        await self._read_now()
        return sorted(self._current.values(), key=lambda limit: limit.name)

    async def set(self, limit: RateLimit) -> RateLimit:
        """Store `limit`, replacing the name's earlier one."""
        await self._write(lambda stored: {**stored, limit.name: limit})
        return limit

    async def delete(self, name: str) -> None:
        """Remove the stored limit of `name`; NotFound when there is none."""
        def without(stored: Stored) -> Stored:
            if name not in stored:
                configured = name in self._configured
                stays = " (the config file's limit for it stays: edit the file)" if configured else ""
                raise NotFound(f"no stored rate limit for task name {name[:80]!r}{stays}")
            return {key: limit for key, limit in stored.items() if key != name}

        await self._write(without)

    async def _read(self) -> None:
        found = (await self.backend.get([RATE_LIMITS_KEY])).get(RATE_LIMITS_KEY)
        self._apply(decode(found.data) if found is not None else {})

    def _apply(self, stored: Stored) -> None:
        self._stored = stored
        self._current = {**self._configured, **stored}
        self._mark_read()

    async def _write(self, edit: Callable[[Stored], Stored]) -> None:
        """Apply `edit` to the stored table by compare-and-set (kept: no TTL removes it)."""
        table = VersionedRecords(self.backend, decode, encode, keep=True, rounds=MAX_WRITE_ROUNDS)
        async with self._lock:
            try:
                stored = await table.change(RATE_LIMITS_KEY, lambda read: edit(read.record if read else {}))
            except ConflictError:
                raise Unavailable("the rate limits kept changing under this write; try again") from None
        assert stored is not None  # `edit` always gives a table to write
        self._apply(stored)


def configured_limits(specs: Mapping[str, str | Mapping[str, Any]]) -> list[RateLimit]:
    """Limits of the config file's `rate_limits:` mapping: name -> "100/s", or name -> {rate,
    burst, per_key}. InvalidArgument names the entry that is wrong."""
    limits = []
    for name, spec in specs.items():
        if isinstance(spec, str):
            limits.append(rate_limit(name, spec, source=Source.CONFIG))
            continue
        unknown = set(spec) - {"rate", "burst", "per_key"}
        if "rate" not in spec or unknown:
            raise InvalidArgument(f"rate_limits.{name}: give a rate like 100/s, or a mapping of rate, burst, per_key")
        limits.append(rate_limit(name, str(spec["rate"]), int(spec.get("burst", 0)), bool(spec.get("per_key", False)),
                                 Source.CONFIG))
    return limits
