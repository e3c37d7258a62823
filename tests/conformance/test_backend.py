"""The Backend conformance suite: every engine in BACKEND_ENGINES must pass all of it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path

import pytest
import redis.exceptions

from conveyor_server.backends.base import MEMBER_CHUNK, Backend, Changes, GroupMember, Update, Versioned
from conveyor_server.backends.memcached import MemcachedBackend
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.backends.mongodb import MongoBackend
from conveyor_server.backends.redis import RedisBackend
from conveyor_server.backends.sqlite import SqliteBackend
from conveyor_server.engines import open_backend
from tests.fixtures.broker_services import LOOPBACK

# Every byte value, and a payload past typical single-frame / single-page sizes.
ALL_BYTES = bytes(range(256))
LARGE = ALL_BYTES * 400


def every_engine_implements_the_protocol(
    memory: MemoryBackend, sqlite: SqliteBackend, redis: RedisBackend, mongodb: MongoBackend, mc: MemcachedBackend
) -> list[Backend]:
    """Never called: mypy checks here that each engine's signatures match the protocol."""
    return [memory, sqlite, redis, mongodb, mc]


# Engines with one-second expiry granularity keep a 1 s TTL item for up to 3 s.
EXPIRY_WAIT_SECONDS = 4.0


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = EXPIRY_WAIT_SECONDS) -> bool:
    """Whether check() becomes true within `seconds` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@contextlib.asynccontextmanager
async def short_lived(backend_url: str) -> AsyncIterator[Backend]:
    """A second instance of the engine whose TTL is one second."""
    engine = open_backend(backend_url, ttl_seconds=1)
    await engine.connect()
    try:
        yield engine
    finally:
        await engine.close()


class Watching:
    """Consumes backend.watch(keys) in a task and remembers every key it reported."""

    def __init__(self, backend: Backend, keys: Collection[str]) -> None:
        self.reported: set[str] = set()
        # The version told with each key's latest report (None: none told).
        self.versions: dict[str, int | None] = {}
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._consume(backend.watch(keys)))

    async def _consume(self, changes: AsyncIterator[Changes]) -> None:
        async for keys in changes:
            self.reported |= keys
            self.versions.update((key, keys.versions.get(key)) for key in keys)
            self._changed.set()

    async def started(self) -> None:
        # Push engines subscribe when iteration starts; give them time before the write.
        await asyncio.sleep(0.3)
        # The first yield names every key: only what comes after it is news of a write.
        self.reported.clear()
        self.versions.clear()

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


async def test_a_get_of_many_keys_answers_each_with_its_own_record(backend: Backend, prefix: str) -> None:
    # More keys than one script call or one pipeline chunk takes, with absent ones between
    # them: every found key must carry its own data and version, and no absent one shows up.
    keys = [f"{prefix}many-{index}" for index in range(1_203)]
    await backend.insert({key: key.encode() for key in keys[::2]})
    await backend.compare_and_set([Update(key, 1, b"again-" + key.encode()) for key in keys[::6]])

    found = await backend.get(keys)

    assert found == {
        key: Versioned(b"again-" + key.encode(), 2) if index % 6 == 0 else Versioned(key.encode(), 1)
        for index, key in enumerate(keys) if index % 2 == 0
    }


async def test_insert_of_existing_key_leaves_it(backend: Backend, prefix: str) -> None:
    old, new = prefix + "old", prefix + "new"
    await backend.insert({old: b"original"})

    assert await backend.insert({old: b"replacement", new: b"fresh"}) == [old]
    assert await backend.get([old, new]) == {old: Versioned(b"original", 1), new: Versioned(b"fresh", 1)}


async def test_insert_after_stores_the_member_and_inserts_as_insert_does(backend: Backend, prefix: str) -> None:
    group, old, new = prefix + "outbox", prefix + "old", prefix + "new"
    await backend.insert({old: b"original"})
    await backend.add_member(group, "earlier", b"kept")

    existing = await backend.insert_after(
        GroupMember(group, "promise", b"payload", keep=True), {old: b"replacement", new: b"fresh"}, keep=True
    )

    assert existing == [old]
    assert await backend.get([old, new]) == {old: Versioned(b"original", 1), new: Versioned(b"fresh", 1)}
    assert await backend.members(group) == {"earlier": b"kept", "promise": b"payload"}
    # The member's first payload wins, as with add_member().
    assert await backend.insert_after(GroupMember(group, "promise", b"again"), {new: b"x"}) == [new]
    assert await backend.members(group) == {"earlier": b"kept", "promise": b"payload"}
    assert await backend.add_member(group, "last", b"") == 3  # the count saw the promise too


async def test_insert_after_takes_more_records_than_one_call_holds(backend: Backend, prefix: str) -> None:
    keys = [f"{prefix}many-{index}" for index in range(1_203)]
    taken = keys[1::100]  # some already there, in every chunk
    await backend.insert({key: b"taken" for key in taken})

    existing = await backend.insert_after(GroupMember(prefix + "g", "m", b"p"), {key: key.encode() for key in keys})

    assert sorted(existing) == sorted(taken)
    found = await backend.get(keys)
    assert found == {key: Versioned(b"taken" if key in taken else key.encode(), 1) for key in keys}
    assert await backend.members(prefix + "g") == {"m": b"p"}


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


def told_version(engine: Backend, written: int) -> int | None:
    """The version a watch of `engine` tells with an update's change: engines whose feed
    learns it tell it (a reader holding it skips a read); the others tell none."""
    return written if isinstance(engine, (MemoryBackend, RedisBackend)) else None


async def test_watch_sees_writes(backend: Backend, prefix: str) -> None:
    key = prefix + "watched"
    watching = Watching(backend, [key, prefix + "quiet"])
    try:
        await watching.started()
        await backend.insert({key: b"created"})
        await watching.reports(key)
        assert watching.versions[key] is None, "a new record's version is never told"
        await backend.compare_and_set([Update(key, 1, b"updated")])
        await watching.reports(key)
        assert watching.versions[key] == told_version(backend, 2)
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
        assert watching.versions[key] == told_version(writer, 2)
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


async def test_kept_records_groups_and_claims_outlive_the_ttl(backend_url: str, prefix: str) -> None:
    async with short_lived(backend_url) as engine:
        kept, cas_kept, expiring = prefix + "kept", prefix + "cas-kept", prefix + "expiring"
        group, claim = prefix + "group", prefix + "claim"
        try:
            await engine.insert({kept: b"live"}, keep=True)
            await engine.insert({cas_kept: b"v1"})
            assert await engine.compare_and_set([Update(cas_kept, 1, b"v2", keep=True)]) == [True]
            assert await engine.add_member(group, "m1", b"p1", keep=True) == 1
            assert await engine.claim(claim, keep=True) is True
            # Written after everything kept: once it has expired, their TTL would have passed too.
            await engine.insert({expiring: b"result"})

            async def expiring_gone() -> bool:
                return not await engine.get([expiring])

            assert await eventually(expiring_gone)
            await asyncio.sleep(1.0)  # and a whole TTL more, for good measure
            assert await engine.get([kept, cas_kept, expiring]) == {
                kept: Versioned(b"live", 1),
                cas_kept: Versioned(b"v2", 2),
            }
            assert await engine.members(group) == {"m1": b"p1"}
            assert await engine.claim(claim) is False
        finally:
            await engine.expire(records=[kept, cas_kept], groups=[group], claims=[claim])


async def test_a_later_write_without_keep_starts_the_ttl(backend_url: str, prefix: str) -> None:
    async with short_lived(backend_url) as engine:
        record, group = prefix + "record", prefix + "group"
        await engine.insert({record: b"queued"}, keep=True)
        await engine.add_member(group, "m1", b"p1", keep=True)
        assert await engine.add_member(group, "m2", b"p2", keep=True) == 2

        assert await engine.compare_and_set([Update(record, 1, b"done")]) == [True]
        # A duplicate add is a write too: the group now expires.
        assert await engine.add_member(group, "m1", b"ignored") == 2

        async def both_gone() -> bool:
            return not await engine.get([record]) and not await engine.members(group)

        assert await eventually(both_gone)
        # Gone means gone: a new group of that name starts empty.
        assert await engine.add_member(group, "m3", b"p3") == 1
        assert await engine.members(group) == {"m3": b"p3"}


async def test_expire_starts_the_ttl_of_kept_keys(backend_url: str, prefix: str) -> None:
    async with short_lived(backend_url) as engine:
        record, group, claim = prefix + "record", prefix + "group", prefix + "claim"
        await engine.insert({record: b"done"}, keep=True)
        await engine.add_member(group, "m1", b"p1", keep=True)
        assert await engine.claim(claim, keep=True) is True

        await engine.expire(records=[record], groups=[group], claims=[claim])
        await engine.expire(records=[record], groups=[group], claims=[claim])  # idempotent
        assert await engine.get([record]) == {record: Versioned(b"done", 1)}  # not at once

        async def all_gone() -> bool:
            return not await engine.get([record]) and not await engine.members(group)

        assert await eventually(all_gone)
        assert await engine.claim(claim) is True  # the old claim expired too


async def test_expire_of_missing_keys_is_a_no_op(backend: Backend, prefix: str) -> None:
    missing = [prefix + "missing"]
    await backend.expire()
    await backend.expire(records=missing, groups=missing, claims=missing)
    assert await backend.get(missing) == {}
    assert await backend.members(missing[0]) == {}
    assert await backend.claim(missing[0]) is True
    assert await backend.add_member(missing[0], "m1", b"p1") == 1


# Names out of order, with non-ASCII ones: pages follow code point order (Python's str order).
PAGED_NAMES = [f"member-{i:03}" for i in range(40)] + ["A", "Z", "a", "z", "é", "\uffff", "😀", "~", "0"]


async def test_members_are_read_in_pages_by_name(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    names = random.Random(7).sample(PAGED_NAMES, len(PAGED_NAMES))
    for name in names:
        await backend.add_member(group, name, name.encode())
    ordered = sorted(names)

    everything = await backend.members(group)
    assert list(everything) == ordered
    assert all(payload == name.encode() for name, payload in everything.items())

    pages: list[list[str]] = []
    after = ""
    while page := await backend.members(group, after=after, limit=7):
        assert len(page) <= 7
        pages.append(list(page))
        after = pages[-1][-1]
    assert [name for page in pages for name in page] == ordered
    assert [len(page) for page in pages] == [7] * 7

    # `after` need not be a member; limit 0 means all; past the end there is nothing.
    assert list(await backend.members(group, after="member-0195")) == [n for n in ordered if n > "member-0195"]
    assert list(await backend.members(group, after="member-010", limit=2)) == ["member-011", "member-012"]
    assert await backend.members(group, after=ordered[-1]) == {}
    assert await backend.members(prefix + "no-such-group", limit=5) == {}

    await backend.remove_member(group, "member-011")
    assert list(await backend.members(group, after="member-010", limit=2)) == ["member-012", "member-013"]


async def test_member_counts_stay_exact_under_concurrent_adds(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    # 50 concurrent adds of 40 distinct members (10 duplicates), like redelivered chord members.
    members = [f"m{i % 40:02}" for i in range(50)]
    random.Random(3).shuffle(members)
    counts = await asyncio.gather(*(backend.add_member(group, m, m.encode(), keep=True) for m in members))
    assert max(counts) == 40
    assert all(1 <= count <= 40 for count in counts)
    assert await backend.add_member(group, "m00", b"again") == 40
    assert sorted(await backend.members(group)) == sorted(set(members))

    await asyncio.gather(*(backend.remove_member(group, f"m{i:02}") for i in range(0, 40, 2)))
    assert await backend.add_member(group, "m01", b"again") == 20
    assert await backend.add_member(group, "new", b"new") == 21
    await backend.expire(groups=[group])


async def test_member_counts_stay_exact_across_instances(shared_backend_url: str, prefix: str) -> None:
    first, second = open_backend(shared_backend_url), open_backend(shared_backend_url)
    await first.connect()
    await second.connect()
    try:
        group = prefix + "group"
        adds = [(engine, f"m{i % 40:02}") for i in range(60) for engine in (first, second)][:100]
        counts = await asyncio.gather(*(engine.add_member(group, m, b"p") for engine, m in adds))
        assert max(counts) == 40
        # Exactly one add may see the last member arrive first... or several, but never more than 40.
        assert all(1 <= count <= 40 for count in counts)
        assert await first.add_member(group, "m00", b"p") == 40
        assert await second.add_member(group, "extra", b"p") == 41
        assert len(await first.members(group)) == 41

        # Removals and adds from both at once: 41 - 20 + 10.
        await asyncio.gather(
            *(engine.remove_member(group, f"m{i:02}") for i in range(20) for engine in (first, second)),
            *((first, second)[i % 2].add_member(group, f"n{i}", b"p") for i in range(10)),
        )
        assert await second.add_member(group, "extra", b"p") == 31
        assert len(await first.members(group)) == 31
    finally:
        await first.close()
        await second.close()


async def test_a_batch_of_members_is_added_as_one_at_a_time_would_be(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    assert await backend.add_members(group, {}) == 0
    assert await backend.members(group) == {}

    assert await backend.add_member(group, "a", b"first-a") == 1
    # A member already in keeps its first payload and counts once, whether added alone or in a batch.
    assert await backend.add_members(group, {"a": b"ignored", "b": b"first-b", "c": b"first-c"}) == 3
    assert await backend.add_members(group, {"c": b"ignored", "b": b"ignored"}) == 3
    assert await backend.add_member(group, "b", b"ignored") == 3
    assert await backend.add_member(group, "d", b"first-d") == 4
    assert await backend.add_members(group, {"e": b"first-e", "d": b"ignored"}) == 5
    assert await backend.members(group) == {name: f"first-{name}".encode() for name in "abcde"}


async def test_a_batch_removal_forgets_its_members_and_ignores_absent_ones(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    await backend.remove_members(prefix + "no-such-group", ["a"])
    assert await backend.members(prefix + "no-such-group") == {}
    await backend.add_members(group, {name: name.encode() for name in "abcde"})

    await backend.remove_members(group, ["b", "never-added", "d", "b"])
    await backend.remove_members(group, [])
    assert await backend.members(group) == {"a": b"a", "c": b"c", "e": b"e"}
    # Counts stay exact: a duplicate adds nothing, a removed member comes back as a new one.
    assert await backend.add_member(group, "a", b"again") == 3
    assert await backend.add_members(group, {"b": b"back", "c": b"again"}) == 4
    assert await backend.members(group) == {"a": b"a", "b": b"back", "c": b"c", "e": b"e"}

    await backend.remove_members(group, ["a", "b", "c", "e"])
    assert await backend.members(group) == {}
    assert await backend.add_member(group, "z", b"z") == 1


async def test_batches_larger_than_a_chunk_are_added_and_removed_whole(backend: Backend, prefix: str) -> None:
    group = prefix + "group"
    names = [f"task-{i:05}" for i in range(2 * MEMBER_CHUNK + 234)]
    assert await backend.add_member(group, names[700], b"first") == 1

    assert await backend.add_members(group, {name: name.encode() for name in names}) == len(names)
    found = await backend.members(group)
    assert sorted(found) == names
    assert found[names[700]] == b"first"

    await backend.remove_members(group, [*names[: MEMBER_CHUNK + 100], "absent"])
    left = names[MEMBER_CHUNK + 100 :]
    assert list(await backend.members(group)) == left
    assert await backend.add_member(group, left[0], b"again") == len(left)


async def test_kept_batches_outlive_the_ttl_until_an_expiring_batch(backend_url: str, prefix: str) -> None:
    async with short_lived(backend_url) as engine:
        group, expiring = prefix + "group", prefix + "expiring"
        assert await engine.add_members(group, {"m1": b"p1", "m2": b"p2"}, keep=True) == 2
        await engine.insert({expiring: b"result"})

        async def expiring_gone() -> bool:
            return not await engine.get([expiring])

        assert await eventually(expiring_gone)
        assert await engine.members(group) == {"m1": b"p1", "m2": b"p2"}
        # A batch of members already in is a write too: the group now expires.
        assert await engine.add_members(group, {"m2": b"ignored"}) == 2

        async def group_gone() -> bool:
            return not await engine.members(group)

        assert await eventually(group_gone)


async def test_insert_after_gives_the_member_and_the_records_each_their_own_expiry(
    backend_url: str, prefix: str
) -> None:
    async with short_lived(backend_url) as engine:
        kept_group, expiring_group = prefix + "kept-group", prefix + "expiring-group"
        kept, expiring = prefix + "kept", prefix + "expiring"
        try:
            await engine.insert_after(GroupMember(kept_group, "m", b"p", keep=True), {expiring: b"result"})
            await engine.insert_after(GroupMember(expiring_group, "m", b"p"), {kept: b"live"}, keep=True)

            async def expired() -> bool:
                return not await engine.get([expiring]) and not await engine.members(expiring_group)

            assert await eventually(expired)
            assert await engine.get([kept]) == {kept: Versioned(b"live", 1)}
            assert await engine.members(kept_group) == {"m": b"p"}
        finally:
            await engine.expire(records=[kept], groups=[kept_group])


async def test_member_counts_stay_exact_under_concurrent_batches_across_instances(
    shared_backend_url: str, prefix: str
) -> None:
    first, second = open_backend(shared_backend_url), open_backend(shared_backend_url)
    await first.connect()
    await second.connect()
    try:
        group = prefix + "group"
        names = [f"m{i:02}" for i in range(60)]
        # Overlapping batches of 20 from both instances at once, single adds among them.
        batches = [dict.fromkeys(names[start : start + 20], b"p") for start in range(0, 60, 10)]
        counts = await asyncio.gather(
            *((first, second)[i % 2].add_members(group, batch) for i, batch in enumerate(batches)),
            *((second, first)[i % 2].add_member(group, name, b"p") for i, name in enumerate(names[::7])),
        )
        assert max(counts) == 60
        assert all(1 <= count <= 60 for count in counts)
        assert await first.add_members(group, {"m00": b"p", "extra": b"p"}) == 61

        # Overlapping removals from both at once, and adds: 61 - 50 + 5.
        await asyncio.gather(
            first.remove_members(group, names[:40]),
            second.remove_members(group, names[20:50]),
            second.add_members(group, {f"n{i}": b"p" for i in range(5)}),
        )
        assert await second.add_member(group, "extra", b"p") == 16
        assert sorted(await first.members(group)) == sorted([*names[50:], "extra", *(f"n{i}" for i in range(5))])
    finally:
        await first.close()
        await second.close()


async def test_redis_gives_up_on_a_silent_peer(prefix: str) -> None:
    """A peer that accepts and never answers (a dead host behind a live TCP stack) fails a call
    within the socket timeout instead of hanging it, and the timeout comes from the URL."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    engine = RedisBackend.from_url(f"redis://{LOOPBACK}:{port}/0?socket_timeout=0.5&socket_connect_timeout=0.5")
    started = time.monotonic()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await asyncio.wait_for(engine.connect(), 10)
        assert time.monotonic() - started < 5
        assert accepted, "the client never reached the silent peer"
    finally:
        await engine.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_mongodb_counts_stay_exact_when_a_replica_dies_between_its_writes(
    mongodb_backend_url: str, prefix: str
) -> None:
    """MongoDB has no multi-document atomicity here: a member insert and the count update are two
    writes. A replica that dies between them must leave neither a lost nor a double count."""
    engine = MongoBackend.from_url(mongodb_backend_url)
    await engine.connect()
    group = prefix + "chord"
    try:
        assert await engine.add_member(group, "m0", b"p0") == 1
        doc = await engine._groups.find_one({"_id": group})
        assert doc is not None
        gen = doc["gen"]
        # A replica inserted m1 into the next slot and died before counting it.
        await engine._members.insert_one({"g": group, "gen": gen, "m": "m1", "i": 2, "p": b"p1"})
        assert await engine.add_member(group, "m2", b"p2") == 3
        # m3 likewise; then m3's redelivery is counted once, not twice and not never.
        await engine._members.insert_one({"g": group, "gen": gen, "m": "m3", "i": 4, "p": b"p3"})
        assert await engine.add_member(group, "m3", b"again") == 4
        # A removal died after turning m2 into hole number 1: the next duplicate add settles it.
        await engine._members.update_one({"g": group, "gen": gen, "m": "m2"}, {"$set": {"m": 1}, "$unset": {"p": ""}})
        assert await engine.add_member(group, "m0", b"again") == 3
        assert await engine.members(group) == {"m0": b"p0", "m1": b"p1", "m3": b"p3"}
    finally:
        await engine.expire(groups=[group])
        await engine.close()


# -- upgrades: groups written by the previous layout of each engine are read by the new one ----


@pytest.mark.parametrize("order", [["m1", "m3", "m0", "m2"], ["m0", "m1", "m2", "m3"]])
async def test_mongodb_counts_stay_exact_when_another_replica_removes_part_of_a_batch_first(
    mongodb_backend_url: str, prefix: str, order: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch removal reads which members are in, then numbers their holes in one bulk write. Another
    replica removing some of them in between must leave neither a lost nor a double count."""
    engine, other = MongoBackend.from_url(mongodb_backend_url), MongoBackend.from_url(mongodb_backend_url)
    await engine.connect()
    await other.connect()
    group = prefix + "group"
    read_present = engine._present

    async def then_other_removes(group: str, gen: str, names: Collection[str]) -> set[str]:
        found = await read_present(group, gen, names)
        monkeypatch.setattr(engine, "_present", read_present)  # once
        await other.remove_members(group, ["m1", "m3"])
        return found

    try:
        assert await engine.add_members(group, {f"m{i}": b"p" for i in range(6)}) == 6
        monkeypatch.setattr(engine, "_present", then_other_removes)
        await engine.remove_members(group, order)
        assert await engine.members(group) == {"m4": b"p", "m5": b"p"}
        assert await other.add_member(group, "m4", b"again") == 2
        await other.remove_member(group, "m5")
        assert await engine.add_member(group, "m6", b"p") == 2
    finally:
        await engine.expire(groups=[group])
        await engine.close()
        await other.close()


async def test_sqlite_migrates_groups_of_the_old_layout(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE members (grp TEXT NOT NULL, member TEXT NOT NULL, payload BLOB NOT NULL,"
            " expires_at REAL NOT NULL, PRIMARY KEY (grp, member))"
        )
        later = time.time() + 3600
        conn.executemany(
            "INSERT INTO members VALUES (?, ?, ?, ?)",
            [("schedules", "b", b"2", later), ("schedules", "a", b"1", later), ("gone", "x", b"", 1.0)],
        )
    engine = SqliteBackend(str(path))
    await engine.connect()
    try:
        assert await engine.members("schedules") == {"a": b"1", "b": b"2"}
        assert await engine.members("gone") == {}
        assert await engine.add_member("schedules", "c", b"3") == 3
    finally:
        await engine.close()


async def test_redis_reads_groups_of_the_old_layout(redis_backend_url: str, prefix: str) -> None:
    engine = RedisBackend.from_url(redis_backend_url)
    await engine.connect()
    group = prefix + "schedules"
    hash_key, index_key = engine._group(group)
    try:
        await engine._redis.hset(hash_key, mapping={"b": b"2", "a": b"1", "c": b"3"})  # no name index
        await engine._redis.pexpire(hash_key, 60_000)
        assert await engine.members(group, limit=2) == {"a": b"1", "b": b"2"}
        assert await engine.members(group, after="b") == {"c": b"3"}
        assert 0 < await engine._redis.pttl(index_key) <= 60_000
        assert await engine.add_member(group, "d", b"4") == 4
    finally:
        await engine._redis.delete(hash_key, index_key)
        await engine.close()


async def test_mongodb_migrates_groups_of_the_old_layout(mongodb_backend_url: str, prefix: str) -> None:
    engine = MongoBackend.from_url(mongodb_backend_url)
    await engine.connect()
    group = prefix + "schedules"
    try:
        # One document per group, members as fields: "k" + the percent-encoded name.
        await engine._groups.insert_one(
            {"_id": group, "m": {"kb%2Ex": b"2", "ka": b"1"}, "n": 2, "exp": int(time.time() * 1000) + 60_000}
        )
        assert await engine.members(group) == {"a": b"1", "b.x": b"2"}
        assert await engine.add_member(group, "a", b"again") == 2
        assert await engine.add_member(group, "c", b"3") == 3
        await engine.remove_member(group, "b.x")
        assert await engine.members(group) == {"a": b"1", "c": b"3"}
    finally:
        await engine.expire(groups=[group])
        await engine.close()


# -- token buckets (rate limits) --------------------------------------------------------------------

# A refill so slow that no token comes back while a test runs: 100 s per token.
SLOW_RATE = 0.01


async def test_a_token_bucket_starts_full_and_grants_whole_tokens(backend: Backend, prefix: str) -> None:
    bucket = prefix + "bucket"
    assert await backend.take_tokens(bucket, SLOW_RATE, 5, 3) == (3, 0.0)
    granted, wait = await backend.take_tokens(bucket, SLOW_RATE, 5, 5)
    assert granted == 2, "only what was left"
    assert 90 < wait <= 100, f"a whole token takes 100 s at this rate, not {wait}"
    granted, wait = await backend.take_tokens(bucket, SLOW_RATE, 5, 1)
    assert granted == 0 and 90 < wait <= 100
    # Buckets are separate, and asking for nothing takes nothing.
    assert await backend.take_tokens(prefix + "other", SLOW_RATE, 5, 5) == (5, 100.0)
    assert (await backend.take_tokens(prefix + "third", SLOW_RATE, 5, 0))[0] == 0
    assert (await backend.take_tokens(prefix + "third", SLOW_RATE, 5, 5))[0] == 5


async def test_a_token_bucket_refills_at_its_rate_up_to_its_burst(backend: Backend, prefix: str) -> None:
    bucket = prefix + "bucket"
    drained_before = time.monotonic()
    assert (await backend.take_tokens(bucket, 20.0, 2, 2))[0] == 2
    granted, wait = await backend.take_tokens(bucket, 20.0, 2, 1)
    if not granted:  # (a busy machine may take the 50 ms a token needs between two calls)
        assert 0 < wait <= 0.05
    assert await eventually(lambda: _granted(backend.take_tokens(bucket, 20.0, 2, 1)), 2.0)
    assert time.monotonic() - drained_before >= 0.05, "a token came back before 1/rate had passed"
    # Idle for what would be 10 tokens: the bucket holds no more than its burst.
    await asyncio.sleep(0.5)
    assert (await backend.take_tokens(bucket, 20.0, 2, 10))[0] == 2


async def test_a_token_bucket_uses_the_rate_of_each_call(backend: Backend, prefix: str) -> None:
    bucket = prefix + "bucket"
    assert (await backend.take_tokens(bucket, SLOW_RATE, 1, 1))[0] == 1
    # The limit was raised: the next token comes at the new rate.
    granted, wait = await backend.take_tokens(bucket, 50.0, 1, 1)
    assert granted == 1 or 0 < wait <= 0.02
    assert await eventually(lambda: _granted(backend.take_tokens(bucket, 50.0, 1, 1)), 2.0)


async def _granted(taking: Awaitable[tuple[int, float]]) -> bool:
    return (await taking)[0] == 1


async def test_concurrent_takes_never_grant_more_than_the_bucket_holds(backend: Backend, prefix: str) -> None:
    bucket = prefix + "bucket"
    taken = await asyncio.gather(*(backend.take_tokens(bucket, SLOW_RATE, 50, 3) for _ in range(30)))
    assert sum(granted for granted, _ in taken) == 50
    assert all(wait > 90 for granted, wait in taken if granted < 3), "a refused take says when to come back"


async def test_takes_from_two_instances_share_one_bucket(shared_backend_url: str, prefix: str) -> None:
    first, second = open_backend(shared_backend_url), open_backend(shared_backend_url)
    await first.connect()
    await second.connect()
    try:
        bucket = prefix + "bucket"
        takes = [engine.take_tokens(bucket, SLOW_RATE, 100, 3) for _ in range(25) for engine in (first, second)]
        taken = await asyncio.gather(*takes)
        assert sum(granted for granted, _ in taken) == 100, "each token granted once, across instances"
        assert (await first.take_tokens(bucket, SLOW_RATE, 100, 1))[0] == 0
        assert (await second.take_tokens(bucket, SLOW_RATE, 100, 1))[0] == 0
    finally:
        await first.close()
        await second.close()


async def test_a_token_bucket_refuses_a_nonsensical_limit(backend: Backend, prefix: str) -> None:
    for rate, burst, wanted in ((0.0, 1.0, 1), (-1.0, 1.0, 1), (float("inf"), 1.0, 1), (1.0, 0.5, 1), (1.0, 1.0, -1)):
        with pytest.raises(ValueError):
            await backend.take_tokens(prefix + "bucket", rate, burst, wanted)
