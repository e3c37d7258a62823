"""Durability of the core under engine faults, on the memory engines through `Core.build`.

Faults are injected into the real memory engines (a publish that fails, a compare-and-set
that loses, a read that fails); each test counts what survived: tasks published, callbacks
sent once, leases refused, records kept. A tiny in-test worker drives the same core paths a
worker stream does (claim, drop_unrunnable, record, settle).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.app import Core
from conveyor_server.backends.base import Update, Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.base import Delivery, OutgoingMessage
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from conveyor_server.core import confirmed, dispatch, outcomes
from conveyor_server.core.clock import SYSTEM_CLOCK
from conveyor_server.core.clock import Clock as CoreClock
from conveyor_server.core.connection import settle
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.outbox import OUTBOX_GROUP
from conveyor_server.core.records import plan_key, task_key
from conveyor_server.core.retry import DEFAULT_INITIAL_SECONDS
from conveyor_server.core.schedules import Schedules
from conveyor_server.core.store import TaskStore
from tests.support.loop_time import loop_clock
from tests.unit.clocks import ManualClock

QUEUE = "default"
GRACE = 10.0


class Outage(ConnectionError):
    """An injected engine error (a ConnectionError, as the engines' clients raise)."""


class FlakyBroker(MemoryBroker):
    """The memory broker; the next `fail_publishes` publishes raise, and publishes are counted."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock=clock)
        self.fail_publishes = 0
        self.published: Counter[str] = Counter()

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if self.fail_publishes:
            self.fail_publishes -= 1
            raise Outage("broker unreachable (injected)")
        await super().publish(queue, messages)
        self.published.update(m.message_id for m in messages)


class FlakyBackend(MemoryBackend):
    """The memory backend; the next `lose_cas` conditional writes lose as to a concurrent
    writer, the next `fail_reads` reads raise, and `hide` keys read as missing."""

    def __init__(self, ttl_seconds: float = 86_400.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl_seconds, clock=clock)
        self.lose_cas = 0
        self.fail_reads = 0
        self.hide: set[str] = set()

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        if self.lose_cas:
            self.lose_cas -= 1
            return [False] * len(updates)
        return await super().compare_and_set(updates)

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise Outage("backend unreachable (injected)")
        found = await super().get(keys)
        return {k: v for k, v in found.items() if k not in self.hide}


class RacingBackend(FlakyBackend):
    """The FlakyBackend, on which two repairs race to take over one claim. Once `race` names a
    record's key, the first two writes that take its claim over (the record re-stamped, not
    confirmed as published) interleave: the first is held, with the version it read, until the
    second's write is in; the second, once in, is held until the first's write has been tried.
    So the first writes over a version gone stale and reads back a takeover not yet confirmed,
    as when two replicas repair one chord at the same moment. `raced` tells which got in."""

    def __init__(self, ttl_seconds: float = 86_400.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl_seconds, clock=clock)
        self.race = ""
        self.raced: dict[str, bool] = {}
        self._second_in = asyncio.Event()
        self._first_tried = asyncio.Event()

    def _takes_over(self, updates: Sequence[Update]) -> bool:
        for update in updates:
            if update.key == self.race:
                record = records_pb2.TaskRecord.FromString(update.data)
                return record.enqueued and not record.published
        return False

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        if len(self.raced) == 2 or not self._takes_over(updates):
            return await super().compare_and_set(updates)
        if "first" not in self.raced:
            self.raced["first"] = False  # arrived: held until the second's takeover is in
            await self._second_in.wait()
            applied = await super().compare_and_set(updates)
            self.raced["first"] = all(applied)
            self._first_tried.set()
            return applied
        applied = await super().compare_and_set(updates)
        self.raced["second"] = all(applied)
        self._second_in.set()
        await self._first_tried.wait()  # not confirmed before the first has tried its own takeover
        return applied


@dataclass
class Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@dataclass
class Engines:
    core: Core
    broker: FlakyBroker
    backend: FlakyBackend
    clock: Clock


def build(broker: FlakyBroker, backend: FlakyBackend, clock: Clock, core_clock: CoreClock = SYSTEM_CLOCK) -> Core:
    settings = Settings(broker_url="memory://", backend_url="memory://", outbox_grace_seconds=GRACE)
    core = Core.build(settings, broker, backend, clock=core_clock)
    core.reconciler.clock = clock
    return core


@pytest.fixture(autouse=True)
def quick_repairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages handed back for repair come back at once (a second in production)."""
    monkeypatch.setattr(outcomes, "REPAIR_DELAY_SECONDS", 0.0)
    monkeypatch.setattr(dispatch, "REPAIR_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)


@pytest.fixture
async def engines() -> AsyncIterator[Engines]:
    broker, backend, clock = FlakyBroker(), FlakyBackend(), Clock()
    await broker.connect()
    await backend.connect()
    yield Engines(build(broker, backend, clock), broker, backend, clock)
    await broker.close()
    await backend.close()


@pytest.fixture
def manual() -> ManualClock:
    return ManualClock()


async def engines_on(manual: ManualClock, backend_type: type[FlakyBackend]) -> AsyncIterator[Engines]:
    """The engines with the core, the broker's delays and the backend's TTLs on `manual`: time
    passes when the test advances it, not by waiting."""
    monotonic = manual.clock.monotonic
    broker, backend, clock = FlakyBroker(clock=monotonic), backend_type(clock=monotonic), Clock()
    await broker.connect()
    await backend.connect()
    yield Engines(build(broker, backend, clock, core_clock=manual.clock), broker, backend, clock)
    await broker.close()
    await backend.close()


@pytest.fixture
async def manual_engines(manual: ManualClock) -> AsyncIterator[Engines]:
    async for made in engines_on(manual, FlakyBackend):
        yield made


@pytest.fixture
async def racing_engines(manual: ManualClock) -> AsyncIterator[Engines]:
    """`manual_engines` on a RacingBackend."""
    async for made in engines_on(manual, RacingBackend):
        yield made


def task(name: str = "noop", task_id: str = "", **kwargs: object) -> task_pb2.Signature:
    return task_pb2.Signature(name=name, id=task_id, queue=QUEUE, **kwargs)  # type: ignore[arg-type]


async def submit(core: Core, *requests: task_service_pb2.SubmitRequest) -> list[task_service_pb2.SubmitResponse]:
    return await core.submitter.submit(list(requests))


def lone(signature: task_pb2.Signature) -> task_service_pb2.SubmitRequest:
    return task_service_pb2.SubmitRequest(task=signature)


def chain(*steps: task_pb2.Signature) -> task_service_pb2.SubmitRequest:
    workflow = workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=[workflow_pb2.Workflow(task=s) for s in steps]))
    return task_service_pb2.SubmitRequest(workflow=workflow)


def chord(members: Sequence[task_pb2.Signature], callback: task_pb2.Signature) -> task_service_pb2.SubmitRequest:
    workflow = workflow_pb2.Workflow(chord=workflow_pb2.Chord(
        header=workflow_pb2.Group(members=[workflow_pb2.Workflow(task=m) for m in members]),
        callback=workflow_pb2.Workflow(task=callback),
    ))
    return task_service_pb2.SubmitRequest(workflow=workflow)


@dataclass
class Run:
    """What one pass of the in-test worker did."""

    leases: list[Lease]
    acks: dict[str, worker_service_pb2.AckStatus.ValueType]
    requeued: dict[str, float]
    fetched: int = 0


async def work(
    core: Core,
    outcome: worker_service_pb2.Outcome.ValueType = worker_service_pb2.OUTCOME_SUCCESS,
    error: str = "",
    worker_id: str = "w1",
) -> Run:
    """Fetch what is ready, claim it, report `outcome` for each, and settle the messages as a
    worker stream does."""
    connections = core.connections
    deliveries: list[Delivery] = await core.broker.fetch(QUEUE, 100, 30.0)
    claim = await connections.dispatcher.claim(deliveries, worker_id, connections.clock.monotonic())
    await connections.dispatcher.drop_unrunnable(claim)
    if not claim.claimed:
        return Run([], {}, {}, len(deliveries))
    outcomes = [
        worker_service_pb2.TaskOutcome(
            task_id=c.lease.task_id, lease_token=c.lease.token, outcome=outcome,
            result=task_pb2.Value(int_value=c.lease.attempt),
            error=result_pb2.TaskError(type=error, message=error) if error else None,
        )
        for c in claim.claimed
    ]
    receipts = {c.lease.task_id: c.lease for c in claim.claimed}
    recorded = await connections.recorder.record(outcomes, worker_id, receipts)
    await settle(core.broker, claim.leases, recorded.requeue)
    return Run(claim.leases, recorded.statuses, recorded.requeue, len(deliveries))


async def drain(core: Core, rounds: int = 20) -> int:
    """Run everything ready (and what it leads to) to success; returns how many tasks ran."""
    ran = 0
    for _ in range(rounds):
        run = await work(core)
        if not run.fetched:
            return ran
        ran += len(run.leases)
    return ran


async def state(core: Core, task_id: str) -> str:
    record = await core.store.get(task_id)
    assert record is not None, f"{task_id} has no record"
    return result_pb2.TaskState.Name(record.result.state)


async def make_due(engines: Engines) -> None:
    """Let the outbox's grace pass and run one reconciler pass."""
    engines.clock.now += GRACE + 1
    await engines.core.reconciler.reconcile_once()


# -- 1. accepted means it will run ------------------------------------------------------------


@pytest.mark.looptime  # the retries' backoff and the polls below are asyncio sleeps: no real time on the fake clock
async def test_a_submit_whose_publish_fails_is_accepted_and_published_by_its_server_soon(engines: Engines) -> None:
    engines.core.submitter.clock = loop_clock()  # its retries' deadline on the same (fake) time
    engines.broker.fail_publishes = 2
    [response] = await submit(engines.core, lone(task(task_id="t1")))
    assert response.task_id == "t1"
    assert engines.broker.published["t1"] == 0
    for _ in range(150):  # retried with backoff: 0.1 s, then 0.2 s
        if engines.broker.published["t1"]:
            break
        await asyncio.sleep(0.02)
    assert engines.broker.published["t1"] == 1
    await engines.core.outbox.drain()
    assert not await engines.backend.members(OUTBOX_GROUP)
    assert await drain(engines.core) == 1


async def test_a_submit_whose_server_died_before_publishing_is_published_by_the_reconciler(engines: Engines) -> None:
    engines.broker.fail_publishes = 1
    await submit(engines.core, lone(task(task_id="t1")))
    await engines.core.submitter.close()  # the server dies: no retry of its own
    assert engines.broker.published["t1"] == 0
    assert (await engines.backend.members(OUTBOX_GROUP)), "the promise to publish is durable"

    await engines.core.reconciler.reconcile_once()
    assert engines.broker.published["t1"] == 0, "nothing is repeated before the grace has passed"
    await make_due(engines)
    assert engines.broker.published["t1"] == 1
    assert await drain(engines.core) == 1
    assert await state(engines.core, "t1") == "TASK_STATE_SUCCESS"
    assert not await engines.backend.members(OUTBOX_GROUP), "the kept promise is forgotten"


async def test_a_repeat_with_the_same_idempotency_key_gets_the_task_that_will_run(engines: Engines) -> None:
    engines.broker.fail_publishes = 1
    [first] = await submit(engines.core, lone(task(idempotency_key="k1")))
    await engines.core.submitter.close()  # the server dies: no retry of its own
    [again] = await submit(engines.core, lone(task(idempotency_key="k1")))
    assert again.task_id == first.task_id
    await make_due(engines)
    assert await drain(engines.core) == 1
    assert await state(engines.core, first.task_id) == "TASK_STATE_SUCCESS"


async def test_a_cron_tick_whose_publish_fails_still_runs(engines: Engines) -> None:
    clock = Clock(now=60.0)
    scheduler = Schedules(engines.backend, engines.core.submitter, engines.core.settings, clock)
    await scheduler.create(admin_service_pb2.Schedule(name="tick", cron="* * * * *", task=task("stamp")))
    clock.now = 120.2
    engines.broker.fail_publishes = 1
    [task_id] = await scheduler.run_due()
    await engines.core.submitter.close()  # the server dies: no retry of its own
    assert engines.broker.published[task_id] == 0
    assert await scheduler.run_due() == [], "the tick counts as fired ..."
    await make_due(engines)
    assert engines.broker.published[task_id] == 1, "... and its task runs after all"


async def test_a_workflow_whose_first_publish_fails_is_started_by_the_reconciler(engines: Engines) -> None:
    engines.broker.fail_publishes = 1
    await submit(engines.core, chain(task(task_id="a"), task(task_id="b")))
    await engines.core.submitter.close()  # the server dies: no retry of its own
    await make_due(engines)
    assert await drain(engines.core) == 2
    assert dict(engines.broker.published) == {"a": 1, "b": 1}


async def test_a_published_submission_is_not_published_again(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t1")), chain(task(task_id="a"), task(task_id="b")))
    await engines.core.outbox.drain()
    await make_due(engines)
    assert engines.broker.published == Counter({"t1": 1, "a": 1})


async def test_a_submit_refused_before_any_write_leaves_no_promise(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t1")))
    await engines.core.outbox.drain()
    with pytest.raises(Exception, match="already exist"):
        await submit(engines.core, lone(task(task_id="t1")))
    assert not await engines.backend.members(OUTBOX_GROUP)


# -- 2. follow-ups survive a publish error ----------------------------------------------------


async def test_a_chain_step_whose_publish_fails_is_repaired_from_the_returned_message(engines: Engines) -> None:
    await submit(engines.core, chain(task(task_id="a"), task(task_id="b")))
    engines.broker.fail_publishes = 1  # publishing b fails
    run = await work(engines.core)
    assert run.acks == {"a": worker_service_pb2.ACK_STATUS_ACCEPTED}, "the result itself is durable"
    assert "a" in run.requeued, "a's message is handed back, not acked, until b is out"
    assert engines.broker.published["b"] == 0

    assert await drain(engines.core) == 1, "a's message comes back, is repaired, and b runs"
    assert engines.broker.published["b"] == 1
    assert await state(engines.core, "b") == "TASK_STATE_SUCCESS"
    assert (await engines.broker.stats(QUEUE)).ready == 0


async def test_link_callbacks_whose_publish_fails_are_sent_once_on_repair(engines: Engines) -> None:
    main = task(task_id="m", on_success=[task("cb")], on_error=[task("eb")])
    await submit(engines.core, lone(main))
    engines.broker.fail_publishes = 1
    run = await work(engines.core)
    assert run.requeued.keys() == {"m"}
    await drain(engines.core)
    assert engines.broker.published["m.ok0"] == 1
    assert await state(engines.core, "m.ok0") == "TASK_STATE_SUCCESS"
    assert "m.err0" not in engines.broker.published


async def test_a_chord_callback_is_sent_once_when_its_last_member_is_repaired(engines: Engines) -> None:
    members = [task(task_id=f"m{i}") for i in range(3)]
    await submit(engines.core, chord(members, task(task_id="cb")))
    engines.broker.fail_publishes = 1  # the callback's publish, after the last member
    run = await work(engines.core)
    assert set(run.requeued) == {"m0", "m1", "m2"} or len(run.requeued) >= 1
    await drain(engines.core)
    assert engines.broker.published["cb"] == 1
    assert await state(engines.core, "cb") == "TASK_STATE_SUCCESS"


# -- 3. repair never fires a follow-up twice --------------------------------------------------


async def test_repair_does_not_resend_a_callback_that_is_queued(engines: Engines) -> None:
    members = [task(task_id=f"m{i}") for i in range(2)]
    await submit(engines.core, chord(members, task(task_id="cb")))
    await work(engines.core)  # both members succeed; the callback is published and waits
    assert engines.broker.published["cb"] == 1
    records = await engines.core.store.load(["m0", "m1"])
    for _ in range(2):  # a lapsed lease brings a member's message back twice: repair runs twice
        await engines.core.connections.dispatcher.followups.after_terminal(
            [found.record for found in records.values()], repair=True
        )
    assert engines.broker.published["cb"] == 1, "a queued callback is not sent again"
    assert await drain(engines.core) == 1


async def _chord_with_an_unconfirmed_callback(engines: Engines) -> list[records_pb2.TaskRecord]:
    """A chord whose callback was claimed but whose publish failed; returns its members' records."""
    members = [task(task_id=f"m{i}") for i in range(2)]
    await submit(engines.core, chord(members, task(task_id="cb")))
    engines.broker.fail_publishes = 1
    await work(engines.core)
    record = await engines.core.store.get("cb")
    assert record is not None and record.enqueued and not record.published
    loaded = await engines.core.store.load(["m0", "m1"])
    return [found.record for found in loaded.values()]


def _claimed_an_hour_earlier(_: str, record: records_pb2.TaskRecord) -> bool:
    record.enqueued_at.FromNanoseconds(record.enqueued_at.ToNanoseconds() - 3600 * 1_000_000_000)
    return True


async def test_two_repairs_at_once_resend_an_unconfirmed_callback_once(
    racing_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = racing_engines
    backend = engines.backend
    assert isinstance(backend, RacingBackend)
    # Claims are stamped and aged on the wall clock (Timestamp.GetCurrentTime, time.time in
    # core/confirmed.py), which the injected clocks do not reach: a claim is made stale by
    # moving its stamp back an hour, far past a grace of a minute, so no real time counts.
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 60.0)
    members = await _chord_with_an_unconfirmed_callback(engines)
    await engines.core.store.update(["cb"], _claimed_an_hour_earlier)  # its claimer failed long ago
    followups = engines.core.connections.dispatcher.followups
    backend.race = task_key("cb")
    # Both members' messages came back at once (their follow-ups failed in an outage): both
    # repairs read the stale claim, then race to take it over.
    async with asyncio.timeout(10):  # a bound on a hang, never waited out when the race runs
        outcomes_ = await asyncio.gather(
            *(followups.after_terminal([member], repair=True) for member in members), return_exceptions=True
        )
    assert backend.raced == {"first": False, "second": True}, "the second took over under the first"
    assert outcomes_ == [None, None]
    assert engines.broker.published["cb"] == 1, "the first saw a takeover within the grace and left it"
    record = await engines.core.store.get("cb")
    assert record is not None and record.published, "the takeover is confirmed"

    # A member's message comes back once more, long after the grace: a published callback is
    # not sent again, however old its claim.
    await engines.core.store.update(["cb"], _claimed_an_hour_earlier)
    await followups.after_terminal(members[:1], repair=True)
    assert engines.broker.published["cb"] == 1, "a confirmed callback is not sent again"
    await drain(engines.core)
    assert await state(engines.core, "cb") == "TASK_STATE_SUCCESS"
    assert engines.broker.published["cb"] == 1
    stats = await engines.broker.stats(QUEUE)
    assert stats.ready + stats.delayed == 0, "nothing is left waiting for a repair"


async def test_repair_leaves_a_fresh_claim_to_its_claimer(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = await _chord_with_an_unconfirmed_callback(engines)
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 60.0)
    followups = engines.core.connections.dispatcher.followups
    with pytest.raises(confirmed.RepairPending):
        await followups.after_terminal(members[:1], repair=True)
    assert engines.broker.published["cb"] == 0, "not while its claimer may still publish it"


async def test_a_second_copy_of_a_running_task_is_dropped_not_run(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t1")))
    deliveries = await engines.broker.fetch(QUEUE, 10, 30.0)
    dispatcher = engines.core.connections.dispatcher
    first = await dispatcher.claim(deliveries, "w1", time.monotonic())
    await dispatcher.record(first.leases, "w1", first.read)
    # The same task published again (a publish repeated after an error): a first delivery.
    await engines.broker.publish(QUEUE, [OutgoingMessage("t1", deliveries[0].body)])
    second = await dispatcher.claim(await engines.broker.fetch(QUEUE, 10, 30.0), "w2", time.monotonic())
    assert not second.claimed and len(second.duplicates) == 1


# -- 4. a retry ends the failed attempt's lease -----------------------------------------------


async def test_a_result_resent_for_a_retried_attempt_is_stale(engines: Engines) -> None:
    retry = task_pb2.RetryPolicy(max_attempts=3)
    await submit(engines.core, lone(task(task_id="t1", retry=retry)))
    run = await work(engines.core, worker_service_pb2.OUTCOME_FAILURE, "Boom")
    assert run.acks == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert await state(engines.core, "t1") == "TASK_STATE_RETRY"
    lease = run.leases[0]
    resent = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    recorded = await engines.core.connections.recorder.record([resent], "w1")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_STALE_LEASE}
    assert await state(engines.core, "t1") == "TASK_STATE_RETRY"


async def test_a_cancelled_reply_after_the_servers_time_limit_failure_does_not_cancel_a_retry(
    engines: Engines,
) -> None:
    retry = task_pb2.RetryPolicy(max_attempts=3)
    await submit(engines.core, lone(task(task_id="t1", retry=retry)))
    deliveries = await engines.broker.fetch(QUEUE, 10, 30.0)
    dispatcher = engines.core.connections.dispatcher
    claim = await dispatcher.claim(deliveries, "w1", time.monotonic())
    await dispatcher.record(claim.leases, "w1", claim.read)
    lease = claim.leases[0]
    recorder = engines.core.connections.recorder
    cause = result_pb2.TaskError(type="TimeLimitExceeded", message="over")
    await recorder.fail_leased([("t1", lease.token)], cause, "w1")
    reply = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_CANCELLED
    )
    recorded = await recorder.record([reply], "w1")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_STALE_LEASE}
    assert await state(engines.core, "t1") == "TASK_STATE_RETRY"


async def test_a_retry_waits_in_the_broker_and_runs_as_the_next_attempt(
    manual_engines: Engines, manual: ManualClock
) -> None:
    engines = manual_engines
    retry = task_pb2.RetryPolicy(max_attempts=2)
    await submit(engines.core, lone(task(task_id="t1", retry=retry)))
    run = await work(engines.core, worker_service_pb2.OUTCOME_FAILURE, "Boom")
    # No jitter by default: the first retry waits the policy's default initial delay.
    assert run.requeued == {"t1": pytest.approx(DEFAULT_INITIAL_SECONDS)}
    stats = await engines.broker.stats(QUEUE)
    assert stats.ready + stats.delayed == 1, "one message: the retry is the same message handed back"
    record = await engines.core.store.get("t1")
    assert record is not None and not record.lease_token
    # Whenever it comes back, it runs as attempt 2 once due (a copy that comes early waits).
    for _ in range(50):
        run = await work(engines.core)
        if run.leases:
            break
        manual.advance(0.05)  # the broker's delay and the retry's due time pass on the engines' clock
    assert [lease.attempt for lease in run.leases] == [2]
    assert await state(engines.core, "t1") == "TASK_STATE_SUCCESS"


# -- 5. the result TTL starts when a task ends --------------------------------------------------


async def test_live_records_and_plans_outlive_the_ttl_and_ended_ones_expire(manual: ManualClock) -> None:
    # The core, the broker and the backend's TTL on one clock the test moves.
    broker = FlakyBroker(clock=manual.clock.monotonic)
    backend, clock = FlakyBackend(ttl_seconds=0.3, clock=manual.clock.monotonic), Clock()
    await broker.connect()
    await backend.connect()
    core = build(broker, backend, clock, core_clock=manual.clock)
    retry = task_pb2.RetryPolicy(max_attempts=3)
    delayed = task(task_id="delayed")
    delayed.countdown.FromSeconds(3600)
    await submit(core, lone(task(task_id="done")), lone(task(task_id="retrying", retry=retry)))
    run = await work(core, worker_service_pb2.OUTCOME_FAILURE, "Boom")  # `done` fails for good, `retrying` will retry
    assert set(run.acks) == {"done", "retrying"}
    [response] = await submit(core, chain(task(task_id="a"), task(task_id="b")))
    await submit(core, lone(task(task_id="queued")), lone(delayed))
    # `a` runs and succeeds (b is queued now); `queued` waits behind it, never fetched.
    deliveries = [d for d in await broker.fetch(QUEUE, 10, 30.0) if d.message_id == "a"]
    claim = await core.connections.dispatcher.claim(deliveries, "w1", manual.monotonic)
    [lease] = claim.leases
    await core.connections.recorder.record(
        [
            worker_service_pb2.TaskOutcome(
                task_id="a", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
            )
        ],
        "w1",
        {"a": lease},
    )
    manual.advance(0.6)  # twice the TTL
    keys = [task_key(t) for t in ("done", "retrying", "queued", "delayed", "a", "b")]
    found = await backend.get([*keys, plan_key(response.workflow_id)])
    assert task_key("done") not in found, "a task that ended expires one TTL later"
    for live in ("retrying", "queued", "delayed", "b"):
        assert task_key(live) in found, f"{live} is live and must not expire"
    assert task_key("a") in found, "an ended step of a running workflow stays with it"
    assert plan_key(response.workflow_id) in found, "a running workflow's plan stays"

    await drain(core)  # b ends, and with it the workflow: its TTL starts
    manual.advance(0.6)
    found = await backend.get([task_key("a"), task_key("b"), plan_key(response.workflow_id)])
    assert found == {}, "a workflow's records and plan expire one TTL after it ends"
    await broker.close()
    await backend.close()


# -- 6. no ACCEPTED for a result that was not stored ----------------------------------------


async def test_a_result_whose_write_lost_and_whose_record_vanished_is_not_accepted(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t1")))
    deliveries = await engines.broker.fetch(QUEUE, 10, 30.0)
    dispatcher = engines.core.connections.dispatcher
    claim = await dispatcher.claim(deliveries, "w1", time.monotonic())
    await dispatcher.record(claim.leases, "w1", claim.read)
    lease = claim.leases[0]
    engines.backend.lose_cas = 1  # the first round's write loses ...
    engines.backend.hide = {task_key("t1")}  # ... and the record is gone when read again
    outcome = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    recorded = await engines.core.connections.recorder.record([outcome], "w1")
    assert recorded.statuses["t1"] != worker_service_pb2.ACK_STATUS_ACCEPTED


# -- 7. a cancel through another replica is seen by dispatch ---------------------------------


async def test_a_task_cancelled_through_another_replica_is_not_started(engines: Engines) -> None:
    replica_b = build(engines.broker, engines.backend, engines.clock)
    await submit(engines.core, lone(task(task_id="t1")))  # replica A remembers it PENDING
    await replica_b.canceller.cancel("t1")
    deliveries = await engines.broker.fetch(QUEUE, 10, 30.0)
    claim = await engines.core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert not claim.claimed and set(claim.ended) == {"t1"}


async def test_a_cancel_whose_follow_ups_fail_is_finished_by_the_reconciler(engines: Engines) -> None:
    await submit(engines.core, chain(task(task_id="a"), task(task_id="b")))
    engines.core.store._recent.clear()
    real = engines.core.canceller.followups.after_terminal
    calls = 0

    async def failing(records: Sequence[records_pb2.TaskRecord], repair: bool = False) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Outage("backend unreachable (injected)")
        await real(records, repair)

    engines.core.canceller.followups.after_terminal = failing  # type: ignore[method-assign]
    with pytest.raises(Outage):
        await engines.core.canceller.cancel("a")
    assert await state(engines.core, "b") == "TASK_STATE_PENDING"
    await make_due(engines)
    assert await state(engines.core, "b") == "TASK_STATE_CANCELLED", "the chain moved on after all"


# -- 11. bounded caches ---------------------------------------------------------------------


async def test_the_plan_cache_keeps_only_the_latest_plans(engines: Engines) -> None:
    store = TaskStore(engines.backend, cached_plans=2)
    plans = [records_pb2.WorkflowPlan(workflow_id=f"wf-{i}") for i in range(3)]
    for plan in plans:
        await store.save_plan(plan)
    assert len(store._plans) == 2
    assert await store.plan("wf-0") is not None, "an evicted plan is read again"


# -- 12. a claim that fails hands the fetched messages back at once ---------------------------


async def test_a_claim_that_fails_on_an_engine_error_hands_its_messages_back(engines: Engines) -> None:
    await submit(engines.core, lone(task(task_id="t1")))
    engines.backend.fail_reads = 1  # the claim's read of t1's record fails once
    session = engines.core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=4))
    pump = asyncio.create_task(engines.core.connections._pump(session, QUEUE))
    try:
        # Leases last 30 s: the assignment can come this soon only if the failed claim's
        # message went straight back to the queue.
        async with asyncio.timeout(5):
            while True:
                message = await session.outbox.get()
                if message is not None and message.WhichOneof("message") == "assignments":
                    break
        assert [a.task.id for a in message.assignments.items] == ["t1"]
    finally:
        pump.cancel()
        await session.close()
