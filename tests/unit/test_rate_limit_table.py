"""The stored rate-limit table (core/limits/table.py): what one replica writes another reads back
whole, the stored form, conflicting writers, and entries a version cannot read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest

from conveyor_server.backends.base import Update
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core.errors import NotFound, Unavailable
from conveyor_server.core.limits import table
from conveyor_server.core.limits.spec import rate_limit
from conveyor_server.core.limits.table import RATE_LIMITS_KEY, RateLimitTable, configured_limits, decode, encode


class LosingWrites(MemoryBackend):
    """The memory backend, where the next `losses` conditional writes of the table lose to
    another writer (they change nothing and report failure)."""

    losses = 0

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        if self.losses:
            self.losses -= 1
            return [False] * len(updates)
        return await super().compare_and_set(updates)

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        if self.losses and RATE_LIMITS_KEY in records:
            self.losses -= 1
            return [RATE_LIMITS_KEY]  # another writer created it first
        return await super().insert(records, keep)


async def test_every_field_of_a_limit_reaches_the_other_replica() -> None:
    backend = MemoryBackend()
    written = rate_limit("charge", "20/m", burst=7, per_key=True)
    await RateLimitTable(backend).set(written)
    await RateLimitTable(backend).set(rate_limit("send", "5/s"))
    [read, other] = await RateLimitTable(backend).all()
    assert read == written
    assert (other.name, other.burst, other.per_key) == ("send", rate_limit("send", "5/s").burst, False)


def test_the_stored_form_is_sorted_json_with_every_field() -> None:
    data = encode({"b": rate_limit("b", "1/s", burst=3, per_key=True), "a": rate_limit("a", "2/m")})
    assert data == json.dumps(json.loads(data), sort_keys=True).encode()
    assert list(json.loads(data)) == ["a", "b"]
    assert json.loads(data)["b"] == {"burst": 3, "per_key": True, "rate": "1/s"}
    assert decode(data) == {"a": rate_limit("a", "2/m"), "b": rate_limit("b", "1/s", burst=3, per_key=True)}


def test_a_stored_entry_this_version_cannot_read_is_left_out() -> None:
    data = json.dumps({
        "bad-rate": {"rate": "fast"}, "no-rate": {"burst": 3}, "bad-burst": {"rate": "1/s", "burst": "x"},
        "fine": {"rate": "3/s"},
    }).encode()
    assert decode(data) == {"fine": rate_limit("fine", "3/s")}


@pytest.mark.parametrize("losses", [1, 2])
async def test_a_write_that_loses_to_another_writer_reads_again_and_goes_on(losses: int) -> None:
    backend = LosingWrites()
    backend.losses = losses  # the first losses: the insert that finds the table created
    await RateLimitTable(backend).set(rate_limit("send", "5/s"))
    await RateLimitTable(backend).set(rate_limit("charge", "1/s"))
    backend.losses = losses
    await RateLimitTable(backend).set(rate_limit("mail", "2/s"))
    assert [limit.name for limit in await RateLimitTable(backend).all()] == ["charge", "mail", "send"]


async def test_a_write_that_always_loses_gives_up_with_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "MAX_WRITE_ROUNDS", 3)
    backend = LosingWrites()
    await RateLimitTable(backend).set(rate_limit("send", "5/s"))
    backend.losses = 3
    with pytest.raises(Unavailable, match=r"^the rate limits kept changing under this write; try again$"):
        await RateLimitTable(backend).set(rate_limit("mail", "2/s"))
    assert [limit.name for limit in await RateLimitTable(backend).all()] == ["send"]


async def test_deleting_a_limit_that_is_not_stored_says_what_stays() -> None:
    subject = RateLimitTable(MemoryBackend(), configured_limits({"send": "10/s"}))
    with pytest.raises(NotFound, match=r"^no stored rate limit for task name 'send' \(the config file's limit for it "
                                       r"stays: edit the file\)$"):
        await subject.delete("send")
    long_name = "n" * 100
    with pytest.raises(NotFound, match=f"^no stored rate limit for task name '{'n' * 80}'$"):
        await subject.delete(long_name)
