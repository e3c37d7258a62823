"""Dispatch limits (core/limits/) at their edges, on the memory backend with clocks the tests
move: the backoff of a task without a free slot, slots lost in a race or met twice in one claim,
the age at which a slot may be pruned, which tasks share a rate bucket, turns at the cap, the
bounds of a rate spec and the messages that name a bad one, and a table that never expires."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conveyor.v1 import task_pb2
from conveyor_server.backends._tokens import TokenBuckets
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.base import Delivery
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.limits import (
    ConcurrencySlots,
    DispatchLimits,
    RateLimiter,
    RateLimitTable,
    concurrency,
    parse_rate,
    rate_limit,
    rates,
)
from conveyor_server.core.limits.concurrency import PRUNE_AFTER_SECONDS, Slot, group_of, wait_for_slot
from conveyor_server.core.limits.rates import MAX_DEFER_SECONDS, bucket_of
from conveyor_server.core.limits.spec import MAX_BURST
from conveyor_server.core.store import TaskStore
from tests.unit.test_durability import Clock


class RecordingBackend(MemoryBackend):
    """The memory backend, recording slot adds and removals; `intruder`, when set, is a member
    another replica adds to a group just before this replica's next add to it."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, str]] = []
        self.removed: list[tuple[str, str]] = []
        self.intruder: tuple[str, str, bytes] | None = None

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        if self.intruder is not None and self.intruder[0] == group:
            _, other, other_payload = self.intruder
            self.intruder = None
            await super().add_member(group, other, other_payload)
        self.added.append((group, member))
        return await super().add_member(group, member, payload, keep)

    async def remove_member(self, group: str, member: str) -> None:
        self.removed.append((group, member))
        await super().remove_member(group, member)


def slots_on(backend: RecordingBackend, clock: Clock) -> ConcurrencySlots:
    return ConcurrencySlots(TaskStore(backend), clock)


# -- the wait of a task that found no free slot ----------------------------------------------------

@pytest.mark.parametrize(("delivery_count", "ceiling"), [
    (0, 0.1), (1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 2.0), (1000, 2.0),
])
def test_the_wait_for_a_slot_doubles_per_delivery_up_to_two_seconds_with_jitter_in_its_upper_half(
    monkeypatch: pytest.MonkeyPatch, delivery_count: int, ceiling: float
) -> None:
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return low

    monkeypatch.setattr(concurrency, "random", SimpleNamespace(uniform=uniform))
    assert wait_for_slot(delivery_count) == pytest.approx(ceiling / 2)
    assert bounds == [pytest.approx((ceiling / 2, ceiling))]


# -- concurrency slots -----------------------------------------------------------------------------

async def test_a_slot_lost_in_a_race_rereads_the_group_so_later_tasks_of_the_key_are_not_added() -> None:
    backend, clock = RecordingBackend(), Clock(1_000.0)
    group = group_of("k")
    backend.intruder = (group, "x", repr(clock()).encode())  # another replica takes the last slot meanwhile
    granted = await slots_on(backend, clock).acquire([Slot("c", "k", 1), Slot("d", "k", 1)])
    assert granted == [False, False]
    assert backend.added == [(group, "c")], "d finds the group full as re-read: no add, no remove"
    assert backend.removed == [(group, "c")]
    assert set(await backend.members(group)) == {"x"}


async def test_a_task_met_twice_in_one_acquire_keeps_the_one_slot_it_took() -> None:
    backend = RecordingBackend()
    assert await slots_on(backend, Clock(1_000.0)).acquire([Slot("a", "k", 1), Slot("a", "k", 1)]) == [True, True]
    assert backend.added == [(group_of("k"), "a")] and backend.removed == []


async def test_a_full_key_whose_members_still_count_refuses_without_adding() -> None:
    backend, clock = RecordingBackend(), Clock(1_000.0)
    group = group_of("k")
    await MemoryBackend.add_member(backend, group, "young", repr(clock()).encode())
    assert await slots_on(backend, clock).acquire([Slot("c", "k", 1)]) == [False]
    assert backend.added == [] and backend.removed == []


async def test_a_slot_is_pruned_only_once_it_is_older_than_the_prune_age() -> None:
    backend, clock = RecordingBackend(), Clock(1_000.0)
    group = group_of("k")
    # A member whose task has no record (ended and gone): stale, once old enough.
    await MemoryBackend.add_member(backend, group, "gone", repr(clock()).encode())
    slots = slots_on(backend, clock)
    clock.now += PRUNE_AFTER_SECONDS  # exactly the prune age: still kept
    assert await slots.acquire([Slot("c", "k", 1)]) == [False]
    assert set(await backend.members(group)) == {"gone"}
    clock.now += 0.5
    assert await slots.acquire([Slot("c", "k", 1)]) == [True]
    assert set(await backend.members(group)) == {"c"}


async def test_releasing_a_lease_frees_its_slot_once_and_clears_its_key() -> None:
    backend = RecordingBackend()
    limits = DispatchLimits(RateLimitTable(backend), RateLimiter(backend), ConcurrencySlots(TaskStore(backend)))
    assert await limits.slots.acquire([Slot("t", "k", 1)]) == [True]
    lease = Lease("t", "token", 1, Delivery("m", b"", "default", "r"), 0.0, 0.0, concurrency_key="k")
    await limits.release([lease])
    assert lease.concurrency_key == ""
    await limits.release([lease])
    assert backend.removed == [(group_of("k"), "t")], "the second release frees nothing"
    assert await backend.members(group_of("k")) == {}


# -- rate buckets ----------------------------------------------------------------------------------

def limiter(clock: Clock) -> RateLimiter:
    backend = MemoryBackend()
    backend.token_buckets = TokenBuckets(Clock(1_000.0))
    return RateLimiter(backend, clock)


def sig(name: str, key: str = "") -> task_pb2.Signature:
    return task_pb2.Signature(name=name, rate_limit_key=key)


def test_each_task_name_and_each_key_of_a_per_key_limit_has_its_own_backend_bucket() -> None:
    # Bucket names are shared by every replica (and every version during an upgrade).
    assert bucket_of(rate_limit("send", "1/s"), sig("send", "a")) == "rate:4:send"
    assert bucket_of(rate_limit("charge", "1/s", per_key=True), sig("charge", "a")) == "rate:6:charge:key:a"


async def test_tasks_without_a_limit_and_tasks_of_other_names_are_admitted_by_index() -> None:
    limits = {"send": rate_limit("send", "1/s"), "mail": rate_limit("mail", "1/s")}
    decision = await limiter(Clock(5_000.0)).decide([sig("free"), sig("send"), sig("mail"), sig("free")], limits)
    assert decision.admitted == [0, 3, 1, 2], "unlimited first, then one token from each name's own bucket"
    assert decision.deferred == {}


async def test_a_limit_that_is_not_per_key_is_one_bucket_whatever_the_tasks_keys() -> None:
    limits = {"send": rate_limit("send", "1/s")}
    decision = await limiter(Clock(5_000.0)).decide([sig("send", "a"), sig("send", "b")], limits)
    assert decision.admitted == [0] and list(decision.deferred) == [1]


async def test_a_turn_exactly_at_the_cap_is_spread_back_within_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rates, "random", SimpleNamespace(uniform=lambda low, high: low))
    limits = {"slow": rate_limit("slow", "1/h")}
    # The bucket's next token is an hour out: the first turn is capped to exactly MAX_DEFER_SECONDS.
    decision = await limiter(Clock(5_000.0)).decide([sig("slow"), sig("slow"), sig("slow")], limits)
    assert decision.admitted == [0]
    assert decision.deferred == {1: MAX_DEFER_SECONDS / 2, 2: MAX_DEFER_SECONDS / 2}


# -- rate specs ------------------------------------------------------------------------------------

def test_a_rate_may_reach_ten_million_a_second_and_a_burst_its_maximum_but_no_further() -> None:
    assert parse_rate("10000000/s") == 1e7
    with pytest.raises(InvalidArgument, match=r"^rate '10000001/s' must be above 0 and at most 10000000/s$"):
        parse_rate("10000001/s")
    assert rate_limit("send", "1/s", burst=MAX_BURST).burst == MAX_BURST
    with pytest.raises(InvalidArgument, match=f"^rate limit burst {MAX_BURST + 1} must be between 0"):
        rate_limit("send", "1/s", burst=MAX_BURST + 1)


def test_a_limits_rate_is_kept_without_spaces_in_lower_case() -> None:
    assert rate_limit("send", " 5 / Sec ").rate == "5/sec"


def test_the_messages_naming_a_bad_rate_or_name_quote_at_most_its_start() -> None:
    with pytest.raises(InvalidArgument, match=f"^rate '{'x' * 40}' is not a rate limit: use <count>/<unit>"):
        parse_rate("x" * 50)
    with pytest.raises(InvalidArgument, match=f"^rate '{'9' * 40}' must be above 0 and at most 10000000/s$"):
        parse_rate("9" * 41 + "/s")
    with pytest.raises(InvalidArgument, match=f"^rate limit name '{'n' * 80}': give the task name "):
        rate_limit("n" * 201, "1/s")


# -- the stored table ------------------------------------------------------------------------------

async def test_the_stored_limits_never_expire() -> None:
    clock = Clock(0.0)
    backend = MemoryBackend(ttl_seconds=60.0, clock=clock)
    await RateLimitTable(backend).set(rate_limit("send", "5/s"))  # the table's first write
    clock.now += 3_600.0
    assert [limit.name for limit in await RateLimitTable(backend).all()] == ["send"]
    await RateLimitTable(backend).set(rate_limit("mail", "2/s"))  # a change of the table
    clock.now += 3_600.0
    assert [limit.name for limit in await RateLimitTable(backend).all()] == ["mail", "send"]
