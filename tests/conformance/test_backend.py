"""The Backend conformance suite: every engine in BACKEND_ENGINES must pass all of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

from conveyor_server.backends.base import Backend, Update, Versioned
from conveyor_server.engines import open_backend

# Every byte value, and a payload past typical single-frame / single-page sizes.
ALL_BYTES = bytes(range(256))
LARGE = ALL_BYTES * 400


class Watching:
    """Consumes backend.watch(keys) in a task and remembers every key it reported."""

    def __init__(self, backend: Backend, keys: Collection[str]) -> None:
        self.reported: set[str] = set()
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._consume(backend.watch(keys)))

    async def _consume(self, changes: AsyncIterator[set[str]]) -> None:
        async for keys in changes:
            self.reported |= keys
            self._changed.set()

    async def started(self) -> None:
        # Push engines subscribe when iteration starts; give them time before the write.
        await asyncio.sleep(0.3)

    async def reports(self, key: str) -> None:
        async with asyncio.timeout(5.0):
            while key not in self.reported:
                self._changed.clear()
                await self._changed.wait()
        self.reported.clear()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_insert_get_version(backend: Backend, prefix: str) -> None:
    key = prefix + "a"
    assert await backend.insert({key: b"first"}) == []
    assert await backend.get([key, prefix + "missing"]) == {key: Versioned(b"first", 1)}
    assert await backend.get([]) == {}


async def test_insert_of_existing_key_leaves_it(backend: Backend, prefix: str) -> None:
    old, new = prefix + "old", prefix + "new"
    await backend.insert({old: b"original"})

    assert await backend.insert({old: b"replacement", new: b"fresh"}) == [old]
    assert await backend.get([old, new]) == {old: Versioned(b"original", 1), new: Versioned(b"fresh", 1)}


async def test_compare_and_set(backend: Backend, prefix: str) -> None:
    key, missing = prefix + "k", prefix + "missing"
    await backend.insert({key: b"v1"})

    assert await backend.compare_and_set([Update(key, 1, b"v2")]) == [True]
    assert await backend.get([key]) == {key: Versioned(b"v2", 2)}
    # Wrong (stale) version, absent key, then the right version: one answer per update, in order.
    assert await backend.compare_and_set(
        [Update(key, 1, b"stale"), Update(missing, 1, b"x"), Update(key, 2, b"v3")]
    ) == [False, False, True]
    assert await backend.get([key, missing]) == {key: Versioned(b"v3", 3)}


async def test_terminal_result_recorded_once(backend: Backend, prefix: str) -> None:
    key = prefix + "task"
    await backend.insert({key: b"running"})
    everyone_read = asyncio.Barrier(20)

    async def finish(writer: int) -> bool:
        current = (await backend.get([key]))[key]
        await everyone_read.wait()  # all 20 race with the version they read
        [won] = await backend.compare_and_set([Update(key, current.version, f"done-{writer}".encode())])
        return won

    won = await asyncio.gather(*(finish(writer) for writer in range(20)))
    assert won.count(True) == 1
    assert await backend.get([key]) == {key: Versioned(f"done-{won.index(True)}".encode(), 2)}


async def test_bytes_round_trip(backend: Backend, prefix: str) -> None:
    values = {prefix + "all": ALL_BYTES, prefix + "large": LARGE, prefix + "empty": b""}
    await backend.insert(values)
    assert await backend.get(list(values)) == {key: Versioned(data, 1) for key, data in values.items()}

    key = prefix + "all"
    assert await backend.compare_and_set([Update(key, 1, LARGE[::-1])]) == [True]
    assert (await backend.get([key]))[key].data == LARGE[::-1]

    group = prefix + "group"
    await backend.add_member(group, "all", ALL_BYTES)
    await backend.add_member(group, "large", LARGE)
    assert await backend.members(group) == {"all": ALL_BYTES, "large": LARGE}


async def test_group_membership(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    assert await backend.members(group) == {}

    assert await backend.add_member(group, "m1", b"first") == 1
    assert await backend.add_member(group, "m1", b"duplicate") == 1
    assert await backend.add_member(group, "m2", b"second") == 2
    assert await backend.members(group) == {"m1": b"first", "m2": b"second"}

    await backend.remove_member(group, "m1")
    await backend.remove_member(group, "never-added")
    assert await backend.members(group) == {"m2": b"second"}
    assert await backend.add_member(group, "m1", b"again") == 2
    assert await backend.members(prefix + "other") == {}


async def test_concurrent_duplicate_members(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    counts = await asyncio.gather(
        *(backend.add_member(group, f"m{i % 5}", f"payload-{i}".encode()) for i in range(40))
    )
    assert max(counts) == 5
    assert all(1 <= count <= 5 for count in counts)
    members = await backend.members(group)
    assert sorted(members) == [f"m{i}" for i in range(5)]
    for member, payload in members.items():
        # Whichever duplicate came first, it is one of the payloads written for that member.
        assert payload in {f"payload-{i}".encode() for i in range(int(member[1:]), 40, 5)}


async def test_claim_exactly_once(backend: Backend, prefix: str) -> None:
    key = prefix + "chord"
    won = await asyncio.gather(*(backend.claim(key) for _ in range(20)))
    assert won.count(True) == 1
    assert await backend.claim(key) is False
    assert await backend.claim(prefix + "other") is True


async def test_claim_exactly_once_across_instances(shared_backend_url: str, prefix: str) -> None:
    first, second = open_backend(shared_backend_url), open_backend(shared_backend_url)
    await first.connect()
    await second.connect()
    try:
        key = prefix + "chord"
        won = await asyncio.gather(*(engine.claim(key) for _ in range(10) for engine in (first, second)))
        assert won.count(True) == 1
    finally:
        await first.close()
        await second.close()


async def test_watch_sees_writes(backend: Backend, prefix: str) -> None:
    key = prefix + "watched"
    watching = Watching(backend, [key, prefix + "quiet"])
    try:
        await watching.started()
        await backend.insert({key: b"created"})
        await watching.reports(key)
        await backend.compare_and_set([Update(key, 1, b"updated")])
        await watching.reports(key)
    finally:
        await watching.stop()


async def test_watch_sees_writes_of_another_instance(shared_backend_url: str, prefix: str) -> None:
    watcher, writer = open_backend(shared_backend_url), open_backend(shared_backend_url)
    await watcher.connect()
    await writer.connect()
    key = prefix + "watched"
    watching = Watching(watcher, [key])
    try:
        await watching.started()
        await writer.insert({key: b"created"})
        await watching.reports(key)
        await writer.compare_and_set([Update(key, 1, b"updated")])
        await watching.reports(key)
    finally:
        await watching.stop()
        await watcher.close()
        await writer.close()


async def test_watch_ends_when_backend_closes(backend_url: str, prefix: str) -> None:
    engine = open_backend(backend_url)
    await engine.connect()
    watching = Watching(engine, [prefix + "k"])
    await watching.started()
    await engine.close()
    await asyncio.wait_for(watching.task, 5)


async def test_expiry(backend_url: str, prefix: str) -> None:
    engine = open_backend(backend_url, ttl_seconds=1)
    await engine.connect()
    key, claim = prefix + "short-lived", prefix + "claim"
    try:
        # The claim first, so it has expired by the time the record has.
        assert await engine.claim(claim) is True
        await engine.insert({key: b"v"})
        assert key in await engine.get([key])

        # Engines with one-second expiry granularity may take up to 2 s; give them 3.
        for _ in range(30):
            if not await engine.get([key]):
                break
            await asyncio.sleep(0.1)
        assert await engine.get([key]) == {}

        # Gone means gone: the key and the claim can be created again.
        assert await engine.insert({key: b"again"}) == []
        assert await engine.get([key]) == {key: Versioned(b"again", 1)}
        assert await engine.claim(claim) is True
    finally:
        await engine.close()


async def test_a_burst_of_concurrent_operations_waits_instead_of_failing(backend: Backend, prefix: str) -> None:
    # More concurrent calls than a default client pool holds (redis-py's is 100).
    key = f"{prefix}burst"
    await backend.insert({key: b"x"})
    results = await asyncio.gather(*(backend.get([key]) for _ in range(300)))
    assert all(found[key].data == b"x" for found in results)
