"""The watch() machinery shared by the backends.

Each backend has one `WatchHub`. Every watch() gets a `Watcher`; the hub registers it with
the backend's single `Feed`, which learns of changes its own way (Redis pub/sub, a MongoDB
change stream, `PollFeed`, which compares a fingerprint per key, or `LocalFeed`, told by the
backend itself when every write goes through this process) and notifies the watchers
of the keys that changed. A `Registry` maps keys to the watchers that want them.

A feed that learns the version a write made (Redis publishes it, the memory backend knows it)
passes it on in `Changes.versions`: a reader that already holds that version, because this
process wrote it, need not read the record again (issue #21: a watch re-read every task after
each of its own replica's writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable, Iterable, Mapping
from typing import Protocol

from ..background import stop_tasks
from ..backoff import Backoff
from .base import ChangeLog, Changes

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


class Watcher:
    """One watch(): changed keys accumulate in a ChangeLog, so a slow consumer costs no memory."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys
        self.pending = ChangeLog()
        self.closed = False
        self._wake = asyncio.Event()

    def notify(self, keys: Iterable[str], version: int | None = None) -> None:
        for key in keys:
            self.pending.note(key, version)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self) -> Changes | None:
        """The keys changed since the last call; None once closed and drained."""
        while not self.pending:
            if self.closed:
                return None
            await self._wake.wait()
            self._wake.clear()
        return self.pending.take()


class Registry:
    """Watchers by key, for a feed that fans changes out."""

    def __init__(self) -> None:
        self.by_key: dict[str, set[Watcher]] = {}

    def add(self, watcher: Watcher) -> list[str]:
        """Register; returns the keys nobody watched before."""
        new = [key for key in watcher.keys if key not in self.by_key]
        for key in watcher.keys:
            self.by_key.setdefault(key, set()).add(watcher)
        return new

    def remove(self, watcher: Watcher) -> list[str]:
        """Unregister; returns the keys nobody watches any more."""
        gone: list[str] = []
        for key in watcher.keys:
            watchers = self.by_key.get(key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self.by_key[key]
                    gone.append(key)
        return gone

    def dispatch(self, key: str, version: int | None = None) -> None:
        """Tell the watchers of `key` that it may have changed (to `version`, where known)."""
        for watcher in self.by_key.get(key, ()):
            watcher.notify((key,), version)

    def dispatch_all(self) -> None:
        """Tell every watcher that all its keys may have changed (after missing changes)."""
        for watchers in list(self.by_key.values()):
            for watcher in watchers:
                watcher.notify(watcher.keys)

    def close_all(self) -> None:
        for watchers in self.by_key.values():
            for watcher in watchers:
                watcher.close()


class Feed(Protocol):
    """Where a backend's changes come from; one per backend, shared by every watch()."""

    async def add(self, watcher: Watcher) -> None:
        """Register `watcher`; once this returns, no later write to its keys can be missed."""

    async def remove(self, watcher: Watcher) -> None:
        """Unregister `watcher`."""

    async def close(self) -> None:
        """Stop the feed's reader."""


class LocalFeed:
    """For a backend whose every write happens in this process: it calls changed() itself."""

    def __init__(self) -> None:
        self._registry = Registry()

    def changed(self, versions: Mapping[str, int | None]) -> None:
        """The keys written, each with the version the write made (None: not known)."""
        for key, version in versions.items():
            self._registry.dispatch(key, version)

    async def add(self, watcher: Watcher) -> None:
        self._registry.add(watcher)

    async def remove(self, watcher: Watcher) -> None:
        self._registry.remove(watcher)

    async def close(self) -> None:
        return None


# Reads a fingerprint per existing key (absent keys are left out); it changes on every write.
Fetch = Callable[[list[str]], Awaitable[dict[str, Hashable]]]
# Whether anything may have changed since the last look (given whether wake() asked for this
# one); False skips reading the fingerprints.
Moved = Callable[[bool], Awaitable[bool]]


class PollFeed:
    """Polls a fingerprint of every watched key for all watchers of one backend; `moved`, when
    given, is asked first and can say that nothing changed without reading them."""

    def __init__(
        self, fetch: Fetch, engine: str, interval: float = POLL_SECONDS, moved: Moved | None = None
    ) -> None:
        self._fetch = fetch
        self._engine = engine
        self._interval = interval
        self._moved = moved
        self._registry = Registry()
        self._seen: dict[str, Hashable] = {}
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self, keys: Iterable[str]) -> None:
        """Look at once when one of `keys` is watched (the backend wrote them itself)."""
        if any(key in self._registry.by_key for key in keys):
            self._woken.set()

    async def add(self, watcher: Watcher) -> None:
        new = self._registry.add(watcher)
        if new:
            # The baseline is read before the first yield, so a later write always differs.
            found = await self._fetch(new)
            for key in new:
                self._seen.setdefault(key, found.get(key))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"conveyor-{self._engine}-poll-watch")

    async def remove(self, watcher: Watcher) -> None:
        for key in self._registry.remove(watcher):
            self._seen.pop(key, None)

    async def close(self) -> None:
        await stop_tasks(self._task)

    async def _run(self) -> None:
        # While the engine is away, polls back off (and log once per attempt, not 20 times a second); a
        # key that changed meanwhile still differs from what was seen, so the first poll that succeeds
        # reports it.
        backoff = Backoff()
        delay = self._interval
        while self._registry.by_key:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), delay)
            # Cleared before looking, so a write that lands during the look is looked at again.
            woken = self._woken.is_set()
            self._woken.clear()
            keys = list(self._registry.by_key)
            try:
                if self._moved is not None and not await self._moved(woken):
                    continue
                found = await self._fetch(keys)
            except Exception as exc:
                delay = backoff.next()
                log.warning("%s watch poll failed (%s: %s); retrying in %.2f s", self._engine, type(exc).__name__,
                            exc, delay)
                continue
            backoff.reset()
            delay = self._interval
            for key in keys:
                if key not in self._registry.by_key:
                    continue
                current = found.get(key)
                if key in self._seen and self._seen[key] != current:
                    self._registry.dispatch(key)
                self._seen[key] = current


class WatchHub:
    """A backend's watch(): its open watchers and its one feed, opened on first use."""

    def __init__(self, open_feed: Callable[[], Awaitable[Feed]]) -> None:
        self._open_feed = open_feed
        self._feed: Feed | None = None
        self._feed_lock = asyncio.Lock()
        self._watchers: set[Watcher] = set()

    async def _feed_once(self) -> Feed:
        async with self._feed_lock:
            if self._feed is None:
                self._feed = await self._open_feed()
            return self._feed

    async def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        """The Backend.watch() contract: the first yield is every key, then what changed."""
        watcher = Watcher(frozenset(keys))
        self._watchers.add(watcher)
        feed: Feed | None = None
        try:
            if watcher.keys:
                feed = await self._feed_once()
                try:
                    await feed.add(watcher)
                except Exception:
                    if watcher.closed:  # close() raced the start
                        return
                    raise
                if watcher.closed:
                    return
                # Anything may have changed before the feed saw this watcher.
                yield Changes(watcher.keys)
            while (changed := await watcher.next()) is not None:
                yield changed
        finally:
            self._watchers.discard(watcher)
            if feed is not None and feed is self._feed:
                await feed.remove(watcher)

    async def close(self) -> None:
        """End every watch() and stop the feed; a later watch() opens a new feed."""
        for watcher in list(self._watchers):
            watcher.close()
        if self._feed is not None:
            feed, self._feed = self._feed, None
            await feed.close()
