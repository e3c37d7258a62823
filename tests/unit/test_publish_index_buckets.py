"""The publish index's buckets (core/publish_index.py): names, which buckets a repair pass takes,
reading members across pages, retiring, and notes kept through a failed flush; memory backend,
explicit clock."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core import publish_index
from conveyor_server.core.publish_index import REGISTRY, Bucket, PublishIndex


@pytest.mark.parametrize("name", ["published:000000000010:5", "published:10:5"])
def test_a_bucket_name_reads_back(name: str) -> None:
    assert Bucket.parse(name) == Bucket(10, 5)
    assert Bucket.parse(Bucket(10, 5).name) == Bucket(10, 5)
    assert Bucket(10, 5).name == "published:000000000010:5"


@pytest.mark.parametrize("name", [
    "published:10:0", "published:10:-5", "published:10", "published:x:5", "published:10:5:7", "other:10:5",
    "10:5", "",
])
def test_a_name_that_is_not_a_bucket_reads_as_none(name: str) -> None:
    assert Bucket.parse(name) is None


def test_a_bucket_holds_the_span_its_time_falls_in() -> None:
    assert Bucket.at(104.9, 5) == Bucket(100, 5)
    assert Bucket.at(105.0, 5) == Bucket(105, 5) and Bucket(105, 5).end == 110


async def registered(*buckets: Bucket) -> PublishIndex:
    index = PublishIndex(MemoryBackend(), 5, clock=lambda: 0.0)
    for bucket in buckets:
        await index.add(bucket, {"q": [f"t-{bucket.start}"]})
    await index.backend.add_member(REGISTRY, "not-a-bucket", b"")
    return index


async def test_a_pass_takes_the_buckets_ended_by_its_time_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_index, "REGISTRY_PAGE", 2)
    index = await registered(*(Bucket(start, 5) for start in (20, 0, 10, 5, 15)))
    assert await index.buckets_until(15) == [Bucket(0, 5), Bucket(5, 5), Bucket(10, 5)]  # 10-15 ended at 15
    assert await index.buckets_until(14.9) == [Bucket(0, 5), Bucket(5, 5)]
    assert await index.buckets_until(15, begun=True) == [Bucket(0, 5), Bucket(5, 5), Bucket(10, 5), Bucket(15, 5)]
    assert await index.buckets_until(100, limit=2) == [Bucket(0, 5), Bucket(5, 5)]
    assert await index.buckets_until(100) == [Bucket(start, 5) for start in (0, 5, 10, 15, 20)]
    assert await index.buckets_until(-1) == []


async def test_tasks_are_read_across_pages_and_retired_buckets_leave_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publish_index, "PAGE", 2)
    index = await registered(Bucket(0, 5), Bucket(5, 5))
    for n in range(5):
        await index.add(Bucket(0, 5), {"q": [f"a{n}"], "r": [f"b{n}"]})
    found = await index.tasks([Bucket(0, 5), Bucket(5, 5)])
    assert found == {"t-0": "q", "t-5": "q", **{f"a{n}": "q" for n in range(5)}, **{f"b{n}": "r" for n in range(5)}}

    await index.retire([])
    await index.retire([Bucket(0, 5)])
    assert await index.buckets_until(100) == [Bucket(5, 5)]
    await index.add(Bucket(0, 5), {"q": ["late"]})  # registered again: this process forgot it had
    assert await index.buckets_until(100) == [Bucket(0, 5), Bucket(5, 5)]


class FailingOnce(MemoryBackend):
    fail = 0

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("backend away (injected)")
        return await super().add_member(group, member, payload, keep)


async def test_notes_a_failed_flush_kept_are_written_by_the_next_with_none_lost_or_doubled() -> None:
    backend = FailingOnce()
    now = [0.0]
    index = PublishIndex(backend, 5, clock=lambda: now[0])
    index.note({"q": ["t1", "t2"]})
    now[0] = 7.0
    index.note({"q": ["t3"], "r": ["t4"]}, delay=10.0)  # may run from 17 s: the 15-20 bucket
    backend.fail = 1
    with pytest.raises(ConnectionError):
        await index.flush()
    index.note({"q": ["t5"]})
    await index.flush()
    assert await index.buckets_until(100) == [Bucket(0, 5), Bucket(5, 5), Bucket(15, 5)]
    by_bucket: Mapping[Bucket, dict[str, str]] = {
        bucket: await index.tasks([bucket]) for bucket in await index.buckets_until(100)}
    assert by_bucket == {Bucket(0, 5): {"t1": "q", "t2": "q"}, Bucket(5, 5): {"t5": "q"},
                         Bucket(15, 5): {"t3": "q", "t4": "r"}}
    await index.close()
