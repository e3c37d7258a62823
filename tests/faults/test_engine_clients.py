"""The backends' engine clients when their engine fails, against real servers the test freezes (SIGSTOP) or kills
and starts again: a call fails within seconds with an error engine_errors calls transient (so clients get
UNAVAILABLE), never hangs; a late reply never answers the next call; the client and its watch() work again once
the engine is back; a feed that lost its engine retries with a backoff instead of twenty times a second.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Hashable, Iterator
from pathlib import Path

import pytest

from conveyor_server.backends._watch import PollFeed, Watcher
from conveyor_server.backends.base import Backend, Changes, Update, Versioned
from conveyor_server.backends.memcached import MemcachedBackend
from conveyor_server.backends.mongodb import CLIENT_TIMEOUTS_MS, MongoBackend, client_timeouts
from conveyor_server.backends.redis import RedisBackend
from conveyor_server.backoff import Backoff
from conveyor_server.engine_errors import is_transient
from tests.faults.rig import EngineProcess
from tests.fixtures.backend_services import start_memcached, start_nx27017
from tests.support.processes import RUN_ID
from tests.support.redis_server import RedisServer
from tests.support.sqlite_lock import SqliteWriteLock

pytestmark = pytest.mark.timeout(120)

# Wall-clock bounds, generous for a loaded machine: what matters is seconds, not the 30 s or forever of before.
FAILS_WITHIN_SECONDS = 8.0
BACK_WITHIN_SECONDS = 10.0


@pytest.fixture
def memcached(tmp_path: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess(lambda port: start_memcached(log_dir=tmp_path, port=port))
    yield engine
    engine.close()


@pytest.fixture
def nx27017(tmp_path: Path) -> Iterator[EngineProcess]:
    engine = EngineProcess(lambda port: start_nx27017(tmp_path, port=port))
    yield engine
    engine.close()


async def opened(backend: Backend) -> Backend:
    await backend.connect()
    return backend


async def fails_transiently(backend: Backend, key: str) -> float:
    """Seconds a get() took to fail; asserts that it failed with a transient error."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(backend.get([key]), 30)  # bounded here only so that a hang fails the test
    except Exception as exc:
        took = time.monotonic() - began
        assert took < 30, "the call hung"
        assert is_transient(exc), f"not transient: {exc!r}"
        return took
    raise AssertionError("the call succeeded while its engine was away")


async def answers_again(backend: Backend, key: str, want: bytes) -> float:
    """Seconds until get() answers `want` again (each try bounded; errors while it is coming back are fine)."""
    began = time.monotonic()
    while time.monotonic() - began < BACK_WITHIN_SECONDS:
        try:
            found = await asyncio.wait_for(backend.get([key]), 10)
            assert found[key].data == want
            return time.monotonic() - began
        except Exception as exc:
            assert is_transient(exc), f"not transient: {exc!r}"
            await asyncio.sleep(0.1)
    raise AssertionError(f"the backend did not answer within {BACK_WITHIN_SECONDS} s of its engine's return")


async def next_change(watch: AsyncIterator[Changes], seconds: float = BACK_WITHIN_SECONDS) -> set[str]:
    return set(await asyncio.wait_for(anext(watch), seconds))


# -- memcached -----------------------------------------------------------------------------------------


async def test_a_frozen_memcached_fails_calls_within_the_timeout_and_a_late_reply_answers_nothing(
    memcached: EngineProcess,
) -> None:
    backend = await opened(MemcachedBackend.from_url(f"{memcached.url}?prefix=tf{RUN_ID}&timeout=0.5&pool_size=2"))
    try:
        await backend.insert({"a": b"A", "b": b"B"})
        memcached.freeze()
        try:
            took = await fails_transiently(backend, "a")
            assert took < FAILS_WITHIN_SECONDS
        finally:
            memcached.thaw()
        # The frozen server answers the get it was sent once thawed: that reply must not answer these.
        for _ in range(3):
            assert await backend.get(["b"]) == {"b": Versioned(b"B", 1)}
            assert await backend.get(["a"]) == {"a": Versioned(b"A", 1)}
    finally:
        await backend.close()


async def test_a_watch_on_memcached_goes_on_after_the_server_was_frozen(memcached: EngineProcess) -> None:
    backend = await opened(MemcachedBackend.from_url(f"{memcached.url}?prefix=tw{RUN_ID}&timeout=0.5"))
    watch = backend.watch(["k"])
    try:
        await backend.insert({"k": b"1"})
        assert await next_change(watch) == {"k"}
        memcached.freeze()
        await asyncio.sleep(1.5)  # polls time out meanwhile
        memcached.thaw()
        assert await backend.compare_and_set([Update("k", 1, b"2")]) == [True]
        assert "k" in await next_change(watch)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await backend.close()


# -- MongoDB (nx-27017) --------------------------------------------------------------------------------


def test_mongodb_client_timeouts_default_unless_the_url_sets_them() -> None:
    assert client_timeouts("mongodb://h:1/db") == CLIENT_TIMEOUTS_MS
    given = client_timeouts("mongodb://h:1/db?sockettimeoutms=60000&prefix=x")
    assert "socketTimeoutMS" not in given
    assert given["serverSelectionTimeoutMS"] == CLIENT_TIMEOUTS_MS["serverSelectionTimeoutMS"]


async def test_a_killed_mongodb_fails_calls_within_seconds_and_answers_again_once_restarted(
    nx27017: EngineProcess,
) -> None:
    backend = await opened(MongoBackend.from_url(f"{nx27017.url}?prefix=tk{RUN_ID}"))
    try:
        await backend.insert({"a": b"A"})
        nx27017.kill()
        assert await fails_transiently(backend, "a") < FAILS_WITHIN_SECONDS
        nx27017.start()  # same port, same database file
        assert await answers_again(backend, "a", b"A") < 3.0
    finally:
        await backend.close()


async def test_a_frozen_mongodb_fails_calls_within_seconds(nx27017: EngineProcess) -> None:
    backend = await opened(MongoBackend.from_url(f"{nx27017.url}?prefix=tz{RUN_ID}"))
    try:
        await backend.insert({"a": b"A"})
        nx27017.freeze()
        try:
            assert await fails_transiently(backend, "a") < FAILS_WITHIN_SECONDS
        finally:
            nx27017.thaw()
        await answers_again(backend, "a", b"A")
    finally:
        await backend.close()


async def test_a_mongodb_watch_goes_on_after_the_server_restarted(nx27017: EngineProcess) -> None:
    backend = await opened(MongoBackend.from_url(f"{nx27017.url}?prefix=tc{RUN_ID}"))
    watch = backend.watch(["k"])
    try:
        await backend.insert({"k": b"1"})
        assert "k" in await next_change(watch)
        nx27017.kill()
        await asyncio.sleep(1.0)  # the stream breaks and its reopening backs off
        nx27017.start()
        await answers_again(backend, "k", b"1")
        assert await backend.compare_and_set([Update("k", 1, b"2")]) == [True]
        assert "k" in await next_change(watch)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await backend.close()


async def test_mongodb_reads_do_not_slow_down_with_the_size_of_the_collection(nx27017: EngineProcess) -> None:
    """nx-27017 runs a find() with an $or filter as a scan of the whole collection: reads select by _id only."""
    backend = await opened(MongoBackend.from_url(f"{nx27017.url}?prefix=ts{RUN_ID}"))

    async def read_seconds() -> float:
        began = time.monotonic()
        for _ in range(20):
            assert await backend.get(["k-0", "missing"]) != {}
        return (time.monotonic() - began) / 20

    try:
        await backend.insert({f"k-{i}": b"x" * 200 for i in range(50)})
        small = await read_seconds()
        for start in range(50, 3000, 500):
            await backend.insert({f"k-{i}": b"x" * 200 for i in range(start, start + 500)})
        large = await read_seconds()
        # A scan costs some 40 us a document: 60x here. By _id: about the same.
        assert large < max(small * 8, 0.02), f"{small * 1000:.1f} ms a read at 50 records, {large * 1000:.1f} at 3000"
    finally:
        await backend.close()


# -- Redis ---------------------------------------------------------------------------------------------


async def test_a_redis_watch_goes_on_after_the_server_restarted(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    backend = await opened(RedisBackend.from_url(server.url(prefix=f"tr{RUN_ID}")))
    watch = backend.watch(["k"])
    try:
        await backend.insert({"k": b"1"}, keep=True)
        assert "k" in await next_change(watch)
        server.stop(signal.SIGKILL)
        await asyncio.sleep(1.0)  # the subscription's reads fail and back off
        server.start()  # its AOF brings k back
        await answers_again(backend, "k", b"1")
        assert await backend.compare_and_set([Update("k", 1, b"2", keep=True)]) == [True]
        assert "k" in await next_change(watch)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await backend.close()
        server.stop(signal.SIGKILL)


# -- the feed and the backoff themselves ---------------------------------------------------------------


async def test_a_poll_feed_backs_off_while_its_engine_is_away_and_then_reports_what_changed() -> None:
    stored: dict[str, Hashable] = {"k": 1}
    away = False
    polls: list[float] = []

    async def fetch(keys: list[str]) -> dict[str, Hashable]:
        polls.append(time.monotonic())
        if away:
            raise ConnectionError("the engine is away")
        return {key: stored[key] for key in keys if key in stored}

    feed = PollFeed(fetch, "test", interval=0.05)
    watcher = Watcher(frozenset({"k"}))
    await feed.add(watcher)
    try:
        away = True
        began = len(polls)
        await asyncio.sleep(2.0)
        # 0.05 s apart, 40 polls; backing off from 0.1 s to 1 s, about 6.
        assert len(polls) - began <= 10, f"{len(polls) - began} polls in 2 s while the engine was away"
        stored["k"] = 2  # changed while the feed could not see it
        away = False
        changed = await asyncio.wait_for(watcher.next(), 3.0)
        assert changed is not None and set(changed) == {"k"}
    finally:
        await feed.close()


def test_backoff_doubles_from_the_first_delay_up_to_the_cap_with_jitter_and_starts_over_on_reset() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    delays = [backoff.next() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1
    spread = {round(Backoff().next(), 6) for _ in range(20)}
    assert len(spread) > 1, "replicas that lost the engine together must not retry in step"


# -- the test helper that locks a SQLite file ----------------------------------------------------------


def test_the_sqlite_write_lock_makes_other_writers_wait_until_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    writer = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x INTEGER)")
    lock = SqliteWriteLock(path)
    with lock:
        assert lock.held
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.execute("INSERT INTO t VALUES (1)")
        assert writer.execute("SELECT COUNT(*) FROM t").fetchone() == (0,), "readers still read (WAL)"
    assert not lock.held
    writer.execute("INSERT INTO t VALUES (1)")
    writer.close()
