"""Versioned records (core/versioned.py) and the backend's TTL: records written without `keep`
expire as the backend's records do (schedules rely on it and rewrite theirs before then); with
`keep` they stay. Memory backend, its expiry clock set by hand."""

from __future__ import annotations

from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core.versioned import VersionedRecords

TTL = 60.0


def records(backend: MemoryBackend, **options: bool) -> VersionedRecords[bytes]:
    return VersionedRecords(backend, bytes, bytes, **options)


async def test_records_written_without_keep_expire_with_the_backends_ttl_and_kept_ones_stay() -> None:
    now = [0.0]
    backend = MemoryBackend(ttl_seconds=TTL, clock=lambda: now[0])
    default, kept = records(backend), records(backend, keep=True)
    assert await default.put("plain", None, b"p")
    assert await kept.put("kept", None, b"k")
    now[0] = TTL - 1
    assert (await default.load(["plain"]))["plain"].record == b"p"
    now[0] = TTL + 1
    assert await default.load(["plain"]) == {}
    assert (await kept.load(["kept"]))["kept"].record == b"k"


async def test_a_rewrite_without_keep_starts_the_ttl_again() -> None:
    now = [0.0]
    backend = MemoryBackend(ttl_seconds=TTL, clock=lambda: now[0])
    table = records(backend)
    await table.change("r", lambda read: b"1")
    now[0] = TTL - 1
    await table.change("r", lambda read: b"2")
    now[0] = TTL + 1  # past the first write's TTL, within the rewrite's
    assert (await table.load(["r"]))["r"].record == b"2"
    now[0] = 2 * TTL
    assert await table.load(["r"]) == {}
