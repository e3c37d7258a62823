"""The reconciler: the edges mutation testing found unpinned (periods in which one replica holds
an entry, passes that go on past an entry held elsewhere or failing but stop at one an engine
refuses, follow-ups kept as a repair, only a promise's own pending tasks republished, the loop
and its quick passes during an outage).

On the shared memory engines of tests/unit/replicas.py, with a reconciler built here on an
injected clock and its own grace. The tests of the loop run on looptime's fake loop clock
(tests/support/loop_time.py): its intervals and backoffs take no real time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor_server.app import Core
from conveyor_server.core import confirmed
from conveyor_server.core import reconciler as reconciler_module
from conveyor_server.core.outbox import PUBLISH
from conveyor_server.core.reconciler import Reconciler
from conveyor_server.core.repair import Repairer, RepairReport
from tests.support.loop_time import loop_now
from tests.support.processes import until
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import Clock, Outage, lone, submit, task
from tests.unit.test_workflow_engine import chain_of, flow, step

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def reconciler(core: Core, grace: float, clock: Clock, repairer: Repairer | None = None) -> Reconciler:
    followups = core.connections.dispatcher.followups
    return Reconciler(
        core.outbox, core.store, followups.publisher, followups.workflow, followups, grace, repairer, clock=clock
    )


def counted_passes(keeper: Reconciler) -> list[float]:
    """When each of `keeper`'s passes began, from now on."""
    passes: list[float] = []
    reconcile_once = keeper.reconcile_once

    async def counted() -> int:
        passes.append(loop_now())
        return await reconcile_once()

    keeper.reconcile_once = counted  # type: ignore[method-assign]
    return passes


def after_each_pass(keeper: Reconciler) -> asyncio.Event:
    """An event set as each of `keeper`'s passes ends (however it ended), for loop_until."""
    ended = asyncio.Event()
    reconcile_once = keeper.reconcile_once

    async def signalled() -> int:
        try:
            return await reconcile_once()
        finally:
            ended.set()

    keeper.reconcile_once = signalled  # type: ignore[method-assign]
    return ended


async def loop_until(changed: asyncio.Event, condition: Callable[[], object], seconds: float, what: str) -> None:
    """Wait until `condition` holds, checked each time `changed` is set, for at most `seconds` of
    the loop's time: under looptime no real time passes (polling would take a loop turn every few
    fake milliseconds)."""
    try:
        async with asyncio.timeout(seconds):
            while not condition():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"{what} not met within {seconds} s of loop time") from None


def period_start(length: float) -> float:
    """The start of a period of `length` seconds well after every entry made so far."""
    return math.floor((time.time() + 100) / length) * length


async def promise_publish(replicas: Replicas, *task_ids: str) -> list[str]:
    """The promises these (submitted, still pending) tasks were written under, left behind as
    if their writer died before confirming them; one entry each."""
    await replicas.a.outbox.drain()
    entries = []
    for task_id in task_ids:
        record = await replicas.a.store.get(task_id)
        assert record is not None
        entries.append(await replicas.a.outbox.promise(PUBLISH, [task_id], entry_id=record.outbox_id))
    return entries


@pytest.mark.parametrize(
    ("grace", "first", "second", "retried"),
    [
        (8.0, 0.0, 1.7, False),  # periods of grace/4 = 2 s: 1.7 s later is the same period
        (8.0, 0.0, 2.0, True),
        (4.0, 0.2, 1.2, True),  # periods are at least 1 s, here exactly 1 s
    ],
)
async def test_an_entry_whose_keeping_failed_is_left_to_its_holder_until_the_next_period(
    replicas: Replicas, grace: float, first: float, second: float, retried: bool
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    start = period_start(max(grace / 4, 1.0))
    clock = Clock(start + first)
    holder = reconciler(replicas.b, grace, clock)
    other = reconciler(replicas.a, grace, clock)
    replicas.broker.fail_publishes = 1
    assert await holder.reconcile_once() == 0
    clock.now = start + second
    assert await other.reconcile_once() == (1 if retried else 0)


async def test_the_holder_of_an_entry_an_engine_refused_tries_it_again_in_the_same_period(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    clock = Clock(period_start(2.0))
    holder = reconciler(replicas.b, 8.0, clock)
    replicas.broker.fail_publishes = 2
    assert await holder.reconcile_once() == 0
    assert holder.refused_passes == 1
    clock.now += 1.0
    assert await holder.reconcile_once() == 0
    assert holder.refused_passes == 2
    assert await holder.reconcile_once() == 1, "its claim for this period is its own"
    assert holder.refused_passes == 0


def refusing(keeper: Reconciler, refused: set[str], error: type[Exception] = Outage) -> list[str]:
    """Make `keeper` fail to keep the entries in `refused` (with `error`); returns the entries it
    tried, in order."""
    tried: list[str] = []
    keep = keeper._keep

    async def recorded(entry_id: str, entry: records_pb2.OutboxEntry) -> None:
        tried.append(entry_id)
        if entry_id in refused:
            raise error(f"{entry_id} refused (injected)")
        await keep(entry_id, entry)

    keeper._keep = recorded  # type: ignore[method-assign]
    return tried


async def test_a_pass_goes_on_past_an_entry_held_elsewhere_or_failing_for_a_reason_other_than_an_outage(
    replicas: Replicas,
) -> None:
    for task_id in ("t1", "t2", "t3"):
        await submit(replicas.a, lone(task(task_id=task_id)))  # one promise each
    entries = sorted(await promise_publish(replicas, "t1", "t2", "t3"))  # the order they are listed in
    clock = Clock(period_start(2.0))
    keeper = reconciler(replicas.b, 8.0, clock)
    period = int(clock.now // 2.0)
    assert await replicas.backend.claim(f"reconcile:{entries[0]}:{period}")  # another replica has it
    tried = refusing(keeper, {entries[1]}, RuntimeError)
    assert await keeper.reconcile_once() == 1
    assert tried == entries[1:]
    assert keeper.refused_passes == 0, "not an outage: the next pass comes after the interval"
    clock.now += 2.0
    tried.clear()
    assert await keeper.reconcile_once() == 1  # the first (its holder died); the second fails again
    assert tried == entries[:2]
    assert set(dict(await replicas.a.outbox.entries(0.0, clock.now))) == {entries[1]}


async def test_a_pass_stops_at_an_entry_an_engine_refuses_and_the_next_tries_it_after_the_others(
    replicas: Replicas,
) -> None:
    for task_id in ("t1", "t2", "t3"):
        await submit(replicas.a, lone(task(task_id=task_id)))
    entries = sorted(await promise_publish(replicas, "t1", "t2", "t3"))  # the order they are listed in
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    tried = refusing(keeper, {entries[0]})
    assert await keeper.reconcile_once() == 0
    assert tried == entries[:1], "the others would be refused too"
    tried.clear()
    assert await keeper.reconcile_once() == 2
    assert tried == [*entries[1:], entries[0]]
    assert keeper.refused_passes == 2
    tried.clear()
    refusing(keeper, {entries[1]})  # (kept already: never tried again)
    assert await keeper.reconcile_once() == 0
    assert tried == [entries[0]]


async def test_a_promise_republishes_its_own_pending_tasks_only(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="mine")))
    await submit(replicas.a, lone(task(task_id="other")))
    await replicas.a.outbox.drain()
    mine = await replicas.a.store.get("mine")
    assert mine is not None
    # The promise "mine" was written under, left behind naming "other" too.
    await replicas.a.outbox.promise(PUBLISH, ["mine", "other"], entry_id=mine.outbox_id)
    before = dict(replicas.broker.published)
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    assert await keeper.reconcile_once() == 1
    assert replicas.broker.published["mine"] == before["mine"] + 1
    assert replicas.broker.published["other"] == before["other"], "its task belongs to another promise"


async def test_follow_ups_kept_by_the_reconciler_resend_what_their_first_pass_claimed(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)
    await submit(replicas.a, flow(chain_of(step("a"), step("b"), on_error=[task(name="alert")])))
    replicas.broker.fail_publishes = 1  # the error callback's publish, when "a" is cancelled
    with pytest.raises(Outage):
        await replicas.a.canceller.cancel("a")
    assert not [t for t, n in replicas.broker.published.items() if ".err" in t and n]
    await replicas.a.outbox.drain()  # the submit's confirmed promise is gone before the clock jumps
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    assert await keeper.reconcile_once() == 1
    assert sum(n for t, n in replicas.broker.published.items() if ".err" in t) == 1


@pytest.mark.looptime
async def test_the_loop_keeps_promises_that_become_overdue_after_its_first_passes(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    published = replicas.broker.published["t1"]
    clock = Clock(time.time() - 3600)  # nothing is overdue yet
    keeper = reconciler(replicas.b, 8.0, clock)
    passes = counted_passes(keeper)
    loop = asyncio.create_task(keeper.run(0.01))
    try:
        await until(lambda: len(passes) >= 2, 10.0, "two passes with nothing overdue")
        clock.now = period_start(2.0)
        await until(lambda: replicas.broker.published["t1"] == published + 1, 10.0, "a later pass kept it")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


@pytest.mark.looptime
async def test_while_an_engine_refuses_passes_come_quickly_and_the_promises_go_out_soon_after_it_returns(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    published = replicas.broker.published["t1"]
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    replicas.broker.fail_publishes = 1_000_000
    assert await keeper.reconcile_once() == 0  # the outage began
    passed = after_each_pass(keeper)
    loop = asyncio.create_task(keeper.run(30.0))  # an interval far longer than the test
    try:
        await loop_until(passed, lambda: keeper.refused_passes >= 4, 5.0, "quick passes while the broker is away")
        replicas.broker.fail_publishes = 0
        returned = loop_now()
        await loop_until(passed, lambda: replicas.broker.published["t1"] == published + 1, 5.0, "kept once it is back")
        waited = loop_now() - returned
        assert waited < reconciler_module.RETRY_MAX_SECONDS + 0.3, f"kept {waited:.2f} s after the broker returned"
        assert keeper.refused_passes == 0
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


class CountingRepairer:
    """Stands in for the repair of lost messages: counts the passes that ran it."""

    def __init__(self) -> None:
        self.runs: list[float] = []
        self.ran = asyncio.Event()

    async def repair_due(self) -> RepairReport:
        self.runs.append(loop_now())
        self.ran.set()
        return RepairReport()


@pytest.mark.looptime
async def test_the_loop_repairs_once_per_interval_even_while_an_outage_makes_its_passes_quick(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    repairer = CountingRepairer()
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)), repairer)  # type: ignore[arg-type]
    replicas.broker.fail_publishes = 1_000_000
    assert await keeper.reconcile_once() == 0  # the outage began
    loop = asyncio.create_task(keeper.run(1.5))
    try:
        await loop_until(repairer.ran, lambda: len(repairer.runs) >= 1, 5.0, "a repair after the first pass")
        passes_at_first_repair = keeper.refused_passes
        await asyncio.sleep(1.0)
        assert keeper.refused_passes > passes_at_first_repair + 1, "the passes went on quickly"
        assert len(repairer.runs) == 1, "the repair waits for the interval, not for the next quick pass"
        await loop_until(repairer.ran, lambda: len(repairer.runs) >= 2, 5.0, "a repair an interval later")
        assert repairer.runs[1] - repairer.runs[0] >= 1.5 - 0.05
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


class StalledRepairer:
    """Stands in for a repair pass that waits on a slow engine until the test lets it go."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def repair_due(self) -> RepairReport:
        self.started.set()
        await self.release.wait()
        return RepairReport()


@pytest.mark.looptime
async def test_a_repair_pass_that_waits_on_the_broker_does_not_hold_up_the_promises(replicas: Replicas) -> None:
    # In CI, moto back from an outage took 3.5 s over one repair pass, and the outage's promises
    # went out only after it: work resumed 4.7 s after the broker's return.
    await submit(replicas.a, lone(task(task_id="t1")))
    await promise_publish(replicas, "t1")
    published = replicas.broker.published["t1"]
    repairer = StalledRepairer()
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)), repairer)  # type: ignore[arg-type]
    replicas.broker.fail_publishes = 1_000_000
    assert await keeper.reconcile_once() == 0  # the outage began
    loop = asyncio.create_task(keeper.run(0.3))
    try:
        await asyncio.wait_for(repairer.started.wait(), 5.0)
        replicas.broker.fail_publishes = 0
        returned = loop_now()
        await until(lambda: replicas.broker.published["t1"] == published + 1, 5.0, "kept during the repair")
        waited = loop_now() - returned
        assert waited < reconciler_module.RETRY_MAX_SECONDS + 0.3, f"kept {waited:.2f} s after the broker returned"
        assert not repairer.release.is_set() and not loop.done()
    finally:
        repairer.release.set()
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


@pytest.mark.looptime
async def test_while_the_outbox_cannot_be_read_passes_come_quickly_and_apart_by_at_most_the_cap(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    reads: list[float] = []
    read = asyncio.Event()

    async def unreachable(*args: object) -> list[object]:
        reads.append(loop_now())
        read.set()
        raise Outage("backend unreachable (injected)")

    monkeypatch.setattr(replicas.b.outbox, "entries", unreachable)
    with pytest.raises(Outage):
        await keeper.reconcile_once()
    keeper.refused_passes = 1  # as run() counts the pass above
    loop = asyncio.create_task(keeper.run(30.0))
    try:
        await loop_until(read, lambda: len(reads) >= 8, 10.0, "quick passes while the outbox cannot be read")
        assert not loop.done(), "the loop goes on"
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert keeper.refused_passes >= 8
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads[1:])]
    cap = reconciler_module.RETRY_MAX_SECONDS
    assert max(gaps) < cap + 0.15, f"a pass waited {max(gaps):.2f} s, past the cap of {cap} s"


@pytest.mark.looptime
async def test_while_the_engines_answer_passes_wait_the_interval(replicas: Replicas) -> None:
    keeper = reconciler(replicas.b, 8.0, Clock(period_start(2.0)))
    passes = counted_passes(keeper)
    loop = asyncio.create_task(keeper.run(0.8))
    try:
        await asyncio.sleep(0.6)
        assert passes == [], "no pass before the interval"
        await until(lambda: len(passes) >= 1, 5.0, "a pass after the interval")
        await asyncio.sleep(0.4)
        assert len(passes) == 1, "the next one an interval later"
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
