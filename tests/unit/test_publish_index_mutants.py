"""The publish index (core/publish_index.py), details the bucket tests leave open: one-second
buckets, how the registry and a bucket's members are paged through the backend, retiring a bucket
another process registered, the buffer bound counting notes kept through a failed flush, and the
flusher stopped at close; memory backend, explicit clock."""

from __future__ import annotations

import asyncio

import pytest

from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core import publish_index
from conveyor_server.core.publish_index import REGISTRY, Bucket, PublishIndex
from tests.unit.test_publish_index_buckets import FailingOnce


class Paged(MemoryBackend):
    """The memory backend, recording each members() call as (group, after, limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str, int]] = []

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        self.reads.append((group, after, limit))
        return await super().members(group, after, limit)


def test_a_one_second_bucket_name_reads_back() -> None:
    # MIN_BUCKET_SECONDS is 1: a short repair_after makes such buckets.
    assert Bucket.parse(Bucket(10, 1).name) == Bucket(10, 1)
    assert Bucket.parse("published:10:1") == Bucket(10, 1)


async def test_a_pass_reads_the_registry_from_its_start_a_small_page_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_index, "REGISTRY_PAGE", 2)
    backend = Paged()
    index = PublishIndex(backend, 5, clock=lambda: 0.0)
    for start in (0, 5, 10, 15, 20):
        await index.add(Bucket(start, 5), {"q": [f"t-{start}"]})
    backend.reads.clear()
    # 0-5 is due, 5-10 is not yet; 10-15 (on the second page) begins after: the pass stops there.
    assert await index.buckets_until(7) == [Bucket(0, 5)]
    assert backend.reads == [(REGISTRY, "", 2), (REGISTRY, Bucket(5, 5).name, 2)]


async def test_a_buckets_tasks_are_read_from_its_first_member_a_page_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_index, "PAGE", 2)
    backend = Paged()
    index = PublishIndex(backend, 5, clock=lambda: 0.0)
    for n in range(3):
        await index.add(Bucket(0, 5), {"q": [f"t{n}"]})
    names = sorted(await backend.members(Bucket(0, 5).name))
    backend.reads.clear()
    assert await index.tasks([Bucket(0, 5)]) == {"t0": "q", "t1": "q", "t2": "q"}
    group = Bucket(0, 5).name
    assert backend.reads == [(group, "", 2), (group, names[1], 2), (group, names[2], 2)]


async def test_a_bucket_another_process_registered_is_retired_here() -> None:
    backend = MemoryBackend()
    writer = PublishIndex(backend, 5, clock=lambda: 0.0)
    await writer.add(Bucket(0, 5), {"q": ["t1"]})
    repairer = PublishIndex(backend, 5, clock=lambda: 100.0)  # e.g. a restarted replica
    [due] = await repairer.buckets_until(100)
    await repairer.retire([due])
    assert await repairer.buckets_until(100) == []


async def test_notes_kept_through_a_failed_flush_count_toward_the_buffer_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_index, "FLUSH_SECONDS", 3_600.0)  # no background flush in this test
    monkeypatch.setattr(publish_index, "MAX_BUFFERED_IDS", 4)
    backend = FailingOnce()
    now = [0.0]
    index = PublishIndex(backend, 5, clock=lambda: now[0])
    index.note({"q": ["t1", "t2"], "r": ["t3"]})
    backend.fail = 1
    with pytest.raises(ConnectionError):
        await index.flush()
    now[0] = 7.0
    index.note({"q": ["t4", "t5"]})  # 3 kept + 2 = 5 ids, past the bound of 4: the oldest bucket goes
    await index.flush()
    assert await index.buckets_until(100) == [Bucket(5, 5)]
    assert await index.tasks([Bucket(5, 5)]) == {"t4": "q", "t5": "q"}
    await index.close()


async def test_close_writes_the_notes_and_leaves_no_flusher_running() -> None:
    index = PublishIndex(MemoryBackend(), 5, clock=lambda: 0.0)
    index.note({"q": ["t1"]})
    await index.close()
    assert await index.tasks(await index.buckets_until(100)) == {"t1": "q"}
    flushers = [t for t in asyncio.all_tasks() if "_flush_soon" in repr(t.get_coro()) and not t.done()]
    assert flushers == []


class Registering(MemoryBackend):
    """The memory backend, recording the bucket names written into the registry, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: list[str] = []

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        if group == REGISTRY:
            self.registered.append(member)
        return await super().add_member(group, member, payload, keep)


async def test_the_registry_and_the_buckets_outlive_the_backends_ttl() -> None:
    now = [0.0]
    index = PublishIndex(MemoryBackend(ttl_seconds=60.0, clock=lambda: now[0]), 5, clock=lambda: 0.0)
    await index.add(Bucket(0, 5), {"q": ["t1"]})
    now[0] = 3_600.0  # long past the TTL: a bucket not yet repaired must still be found
    [due] = await index.buckets_until(100)
    assert due == Bucket(0, 5)
    assert await index.tasks([due]) == {"t1": "q"}


async def test_a_process_registers_a_bucket_once_while_it_remembers_it_and_forgets_the_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publish_index, "REGISTERED_MEMORY", 2)
    backend = Registering()
    index = PublishIndex(backend, 5, clock=lambda: 0.0)
    a, b, c = Bucket(0, 5), Bucket(5, 5), Bucket(10, 5)
    for bucket in (a, b, a, c, c, b, a):  # a third bucket makes it forget the oldest, a
        await index.add(bucket, {"q": ["t"]})
    assert backend.registered == [a.name, b.name, c.name, a.name]


async def test_ids_written_by_a_flush_no_longer_count_toward_the_buffer_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_index, "FLUSH_SECONDS", 3_600.0)  # no background flush in this test
    monkeypatch.setattr(publish_index, "MAX_BUFFERED_IDS", 2)
    now = [0.0]
    index = PublishIndex(MemoryBackend(), 5, clock=lambda: now[0])
    index.note({"q": ["t1"]})
    await index.flush()
    now[0] = 7.0
    index.note({"q": ["t2", "t3"]})  # exactly the bound: nothing is dropped
    await index.flush()
    assert await index.tasks(await index.buckets_until(100)) == {"t1": "q", "t2": "q", "t3": "q"}
    await index.close()
