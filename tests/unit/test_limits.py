"""Rate limits and concurrency keys at dispatch (issue #15, items 3 and 4), on the memory engines
with clocks the tests move: a task over a limit is not assigned but waits in its queue with the
delay its bucket (or the key's slots) gives it, and is never failed; tasks without a limit pass
without a backend call. Also the rate specs, the stored table, and the submit rate limiter's
charge per task."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest

from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.api.ratelimit import SubmitRateLimiter, tasks_in
from conveyor_server.app import Core
from conveyor_server.backends._tokens import TokenBuckets
from conveyor_server.backends.base import Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import ConfigError, Settings, load_settings
from conveyor_server.core.dispatch import Claim
from conveyor_server.core.errors import InvalidArgument, NotFound, ResourceExhausted
from conveyor_server.core.limits import (
    ConcurrencySlots,
    DispatchLimits,
    RateLimiter,
    RateLimitTable,
    Source,
    configured_limits,
    parse_rate,
    rate_limit,
)
from conveyor_server.core.limits.concurrency import PRUNE_AFTER_SECONDS, Slot, group_of
from conveyor_server.core.limits.rates import MAX_DEFER_SECONDS
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import TaskStore
from tests.unit.replicas import SharedBackend
from tests.unit.test_durability import Clock

QUEUE = "default"


# -- specs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "per_second"), [
    ("100/s", 100.0), ("10/m", 10 / 60), ("1000/h", 1000 / 3600), ("0.5/s", 0.5), (" 5 / Sec ", 5.0),
    ("30/minute", 0.5), ("7200/hours", 2.0),
])
def test_rate_specs_read_as_tasks_per_second(spec: str, per_second: float) -> None:
    assert parse_rate(spec) == pytest.approx(per_second)


@pytest.mark.parametrize("spec", ["", "100", "100/x", "/s", "0/s", "-1/s", "1e3/s", "100/s/s", "ten/s", "99999999/s"])
def test_a_bad_rate_spec_is_refused_with_an_example(spec: str) -> None:
    with pytest.raises(InvalidArgument, match=r"rate .* (use <count>/<unit>|must be above 0)"):
        parse_rate(spec)


def test_a_limit_gets_one_seconds_worth_of_burst_unless_told() -> None:
    assert rate_limit("send", "100/s").burst == 100
    assert rate_limit("send", "10/m").burst == 1
    assert rate_limit("send", "100/s", burst=7).burst == 7
    assert rate_limit("send", "5/S").rate == "5/s"
    with pytest.raises(InvalidArgument, match="burst -1"):
        rate_limit("send", "1/s", burst=-1)
    with pytest.raises(InvalidArgument, match="give the task name"):
        rate_limit("", "1/s")


# -- the memory engine's buckets -------------------------------------------------------------------

def test_a_bucket_refills_at_its_rate_up_to_its_burst_on_its_clock() -> None:
    clock = Clock(100.0)
    buckets = TokenBuckets(clock)
    assert buckets.take("b", 2.0, 3, 5) == (3, 0.5)
    clock.now += 0.25
    assert buckets.take("b", 2.0, 3, 1) == (0, 0.25)
    clock.now += 0.25
    assert buckets.take("b", 2.0, 3, 1) == (1, 0.5)
    clock.now += 60
    assert buckets.take("b", 2.0, 3, 10)[0] == 3, "never more than the burst"
    clock.now -= 30  # a clock that went back gives no tokens, and takes none
    assert buckets.take("b", 2.0, 3, 1) == (0, 0.5)


# -- the stored table ------------------------------------------------------------------------------

async def test_limits_set_on_one_replica_reach_the_other_within_a_refresh() -> None:
    backend, clock = MemoryBackend(), Clock(0.0)
    here, there = RateLimitTable(backend, clock=clock), RateLimitTable(backend, clock=clock)
    assert await there.current() == {}
    await here.set(rate_limit("send", "100/s"))
    assert "send" in await here.current(), "at once where it was set"
    assert await there.current() == {}, "the other replica reads again only after a refresh"
    clock.now += 1.0
    assert (await there.current())["send"].per_second == 100.0
    await here.delete("send")
    clock.now += 1.0
    assert await there.current() == {}
    with pytest.raises(NotFound, match="no stored rate limit for task name 'send'"):
        await here.delete("send")


async def test_a_stored_limit_wins_over_the_config_files_and_deleting_it_brings_that_back() -> None:
    backend = MemoryBackend()
    table = RateLimitTable(backend, configured_limits({"send": "10/s", "charge": {"rate": "1/s", "per_key": True}}))
    assert {(limit.name, limit.rate, limit.per_key, limit.source) for limit in await table.all()} == {
        ("charge", "1/s", True, Source.CONFIG), ("send", "10/s", False, Source.CONFIG),
    }
    await table.set(rate_limit("send", "50/s"))
    assert [(limit.rate, limit.source) for limit in await table.all() if limit.name == "send"] == [("50/s", "admin")]
    await table.delete("send")
    assert (await table.current())["send"].rate == "10/s"
    with pytest.raises(NotFound, match="config file's limit for it stays"):
        await table.delete("charge")


class FailingReads(MemoryBackend):
    failing = False

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        if self.failing:
            raise ConnectionError("backend unreachable (injected)")
        return await super().get(keys)


async def test_the_last_known_limits_stay_while_the_backend_cannot_be_read() -> None:
    backend, clock = FailingReads(), Clock(0.0)
    table = RateLimitTable(backend, clock=clock)
    await table.set(rate_limit("send", "5/s"))
    backend.failing = True
    clock.now += 5.0
    assert (await table.current())["send"].rate == "5/s"


def test_the_config_file_takes_rate_limits_and_refuses_bad_ones() -> None:
    settings = load_settings(environ={"CONVEYOR_RATE_LIMITS": '{"send": "100/s", "charge": {"rate": "10/m"}}'})
    assert [limit.burst for limit in configured_limits(settings.rate_limits)] == [100, 1]
    with pytest.raises(ConfigError, match=r"rate_limits.*'5/x' is not a rate limit"):
        load_settings(environ={"CONVEYOR_RATE_LIMITS": '{"send": "5/x"}'})
    with pytest.raises(ConfigError, match="must map task names to rates"):
        load_settings(environ={"CONVEYOR_RATE_LIMITS": '["send"]'})


# -- a server core with controlled clocks ----------------------------------------------------------

class CountingBackend(MemoryBackend):
    """The memory backend, counting calls by method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        self.calls["take_tokens"] += 1
        return await super().take_tokens(bucket, rate_per_second, burst, wanted)

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        self.calls["members"] += 1
        return await super().members(group, after, limit)

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        self.calls["add_member"] += 1
        return await super().add_member(group, member, payload, keep)


@dataclass
class Server:
    core: Core
    backend: CountingBackend
    broker: MemoryBroker
    tokens: Clock  # the backend's bucket clock
    clock: Clock  # this replica's clock (rate turns, ages of concurrency slots)

    @property
    def limits(self) -> DispatchLimits:
        limits = self.core.connections.dispatcher.limits
        assert limits is not None
        return limits

    async def claim(self, worker_id: str = "w1") -> Claim:
        deliveries = await self.broker.fetch(QUEUE, 100, 30.0)
        return await self.core.connections.dispatcher.claim(deliveries, worker_id, time.monotonic())


def serve(broker: MemoryBroker, backend: CountingBackend, tokens: Clock, clock: Clock) -> Server:
    core = Core.build(Settings(broker_url="memory://", backend_url="memory://"), broker, backend)
    table = core.admin.rate_limits
    core.connections.dispatcher.limits = DispatchLimits(
        table, RateLimiter(backend, clock), ConcurrencySlots(core.store, clock)
    )
    return Server(core, backend, broker, tokens, clock)


@pytest.fixture
async def engines() -> AsyncIterator[tuple[MemoryBroker, CountingBackend, Clock]]:
    broker, backend, tokens = MemoryBroker(), CountingBackend(), Clock(1_000.0)
    backend.token_buckets = TokenBuckets(tokens)
    await broker.connect()
    await backend.connect()
    yield broker, backend, tokens
    await broker.close()
    await backend.close()


@pytest.fixture
def server(engines: tuple[MemoryBroker, CountingBackend, Clock]) -> Server:
    broker, backend, tokens = engines
    return serve(broker, backend, tokens, Clock(5_000.0))


@pytest.fixture
async def server_on_one_clock() -> AsyncIterator[Server]:
    """A server whose memory engines read one clock, as in one process: the buckets' refills and
    the broker's delays both pass when the test moves `tokens`, with no waiting."""
    tokens = Clock(1_000.0)
    broker, backend = MemoryBroker(clock=tokens), CountingBackend()
    backend.token_buckets = TokenBuckets(tokens)
    await broker.connect()
    await backend.connect()
    yield serve(broker, backend, tokens, Clock(5_000.0))
    await broker.close()
    await backend.close()


def task(name: str, task_id: str, **fields: object) -> task_service_pb2.SubmitRequest:
    return task_service_pb2.SubmitRequest(
        task=task_pb2.Signature(name=name, id=task_id, queue=QUEUE, **fields)  # type: ignore[arg-type]
    )


async def submit(server: Server, *requests: task_service_pb2.SubmitRequest) -> None:
    await server.core.submitter.submit(list(requests))


async def state(server: Server, task_id: str) -> str:
    record = await server.core.store.get(task_id)
    assert record is not None
    return result_pb2.TaskState.Name(record.result.state)


def claimed_ids(claim: Claim) -> list[str]:
    return sorted(c.lease.task_id for c in claim.claimed)


# -- rate limits at dispatch -----------------------------------------------------------------------

async def test_tasks_without_a_limit_pass_without_a_backend_call(server: Server) -> None:
    await server.core.admin.set_rate_limit(rate_limit("limited", "1/s"))
    await submit(server, *(task("free", f"f{i}", concurrency_key="k") for i in range(5)))
    server.backend.calls.clear()  # (submitting wrote to the backend)
    claim = await server.claim()
    assert len(claim.claimed) == 5 and claim.limited == []
    assert server.backend.calls == Counter(), "no bucket, no group: a key without a limit is no limit"


async def test_tasks_over_a_rate_limit_wait_in_the_queue_each_for_its_turn(server: Server) -> None:
    await server.core.admin.set_rate_limit(rate_limit("send", "10/s", burst=3))
    await submit(server, *(task("send", f"s{i}") for i in range(8)), task("other", "o1"))
    claim = await server.claim()
    assert claimed_ids(claim) == ["o1", "s0", "s1", "s2"], "the burst, and every task of another name"
    assert server.backend.calls["take_tokens"] == 1, "one call for the bucket's tasks in a claim"
    delays = [delay for _, delay in claim.limited]
    # Turns one token interval apart (0.1 s … 0.5 s), rounded up to the 0.3 s the bucket takes
    # to refill: each window's tasks come back together, as many as the bucket then holds.
    assert delays == pytest.approx([0.3, 0.3, 0.3, 0.6, 0.6])

    await server.core.connections._hold_back(claim.limited)
    stats = await server.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed) == (0, 5), "handed back, not failed"
    for task_id in ("s3", "s7"):
        assert await state(server, task_id) == "TASK_STATE_PENDING", "waiting, not failed"

    # A second claim (say on another worker) that meets the bucket empty queues after those.
    await submit(server, task("send", "s8"))
    later = await server.claim()
    assert later.claimed == [] and [delay for _, delay in later.limited] == pytest.approx([0.6]), "after those"


async def test_limited_tasks_run_once_their_tokens_come(server_on_one_clock: Server) -> None:
    server = server_on_one_clock
    await server.core.admin.set_rate_limit(rate_limit("send", "2/s", burst=1))
    await submit(server, *(task("send", f"s{i}") for i in range(3)))
    first = await server.claim()
    await server.core.connections._hold_back(first.limited)
    assert claimed_ids(first) == ["s0"]
    server.tokens.now += 0.5  # one token back; the broker's delays bring the tasks back (due now: no wait)
    deliveries = await server.broker.fetch(QUEUE, 100, 30.0)
    again = await server.core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert len(again.claimed) == 1 and len(again.limited) == len(deliveries) - 1


async def test_a_per_key_limit_gives_each_key_its_own_bucket(server: Server) -> None:
    await server.core.admin.set_rate_limit(rate_limit("charge", "1/m", per_key=True))
    await submit(server, *(task("charge", f"{key}{i}", rate_limit_key=key) for key in ("a", "b") for i in range(2)),
                 task("charge", "n0"), task("charge", "n1"))
    claim = await server.claim()
    assert claimed_ids(claim) == ["a0", "b0", "n0"], "one per key; tasks without a key share a bucket"
    assert all(delay == pytest.approx(60.0) for _, delay in claim.limited)


async def test_a_turn_is_never_further_out_than_the_cap(server: Server) -> None:
    await server.core.admin.set_rate_limit(rate_limit("slow", "1/h"))
    await submit(server, *(task("slow", f"s{i}") for i in range(4)))
    claim = await server.claim()
    assert len(claim.claimed) == 1
    assert all(MAX_DEFER_SECONDS / 2 <= delay <= MAX_DEFER_SECONDS for _, delay in claim.limited)


async def test_two_replicas_draw_on_one_bucket(engines: tuple[MemoryBroker, CountingBackend, Clock]) -> None:
    broker, backend, tokens = engines
    a, b = serve(broker, backend, tokens, Clock(0.0)), serve(broker, backend, tokens, Clock(0.0))
    await a.core.admin.set_rate_limit(rate_limit("send", "5/s"))
    await submit(a, *(task("send", f"s{i}") for i in range(20)))
    deliveries = await broker.fetch(QUEUE, 100, 30.0)
    claims = await asyncio.gather(
        a.core.connections.dispatcher.claim(deliveries[:10], "wa", time.monotonic()),
        b.core.connections.dispatcher.claim(deliveries[10:], "wb", time.monotonic()),
    )
    assert sum(len(claim.claimed) for claim in claims) == 5, "the burst, once, across replicas"


# -- concurrency keys ------------------------------------------------------------------------------

def open_worker(server: Server, worker_id: str = "w1") -> WorkerSession:
    return server.core.connections.open(
        worker_service_pb2.Hello(worker_id=worker_id, queues=[QUEUE], max_in_flight=100)
    )


async def report_success(server: Server, session: WorkerSession, claim: Claim, task_ids: Sequence[str]) -> None:
    """The worker's results for these tasks, through the stream's own handling."""
    await session.settle(0, claim.leases)
    leases = {lease.task_id: lease for lease in claim.leases}
    outcomes = [
        worker_service_pb2.TaskOutcome(
            task_id=t, lease_token=leases[t].token, outcome=worker_service_pb2.OUTCOME_SUCCESS
        )
        for t in task_ids
    ]
    await server.core.connections._results(session, worker_service_pb2.Results(outcomes=outcomes))


async def slots_held(server: Server, key: str) -> set[str]:
    return set(await server.backend.members(group_of(key)))


async def until(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def keyed(task_id: str, key: str = "acct-1", limit: int = 2, name: str = "work") -> task_service_pb2.SubmitRequest:
    return task(name, task_id, concurrency_key=key, concurrency_limit=limit)


async def test_at_most_n_tasks_of_a_key_run_and_a_result_frees_a_slot(server: Server) -> None:
    await submit(server, *(keyed(f"t{i}") for i in range(5)), keyed("x0", key="acct-2"), task("work", "free"))
    session = open_worker(server)
    claim = await server.claim()
    assert claimed_ids(claim) == ["free", "t0", "t1", "x0"]
    assert sorted(claim.leases, key=lambda lease: lease.task_id)[1].concurrency_key == "acct-1"
    assert len(claim.limited) == 3 and all(0 < delay <= 0.1 for _, delay in claim.limited)
    assert await slots_held(server, "acct-1") == {"t0", "t1"}
    await server.core.connections._hold_back(claim.limited)
    for task_id in ("t2", "t3", "t4"):
        assert await state(server, task_id) == "TASK_STATE_PENDING", "waiting, not failed"

    await report_success(server, session, claim, ["t0"])
    await until(lambda: _held_is(server, "acct-1", {"t1"}))
    deliveries = await server.broker.fetch(QUEUE, 100, 30.0, wait_seconds=2.0)
    again = await server.core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert len(again.claimed) == 1 and len(again.limited) == len(deliveries) - 1
    assert await slots_held(server, "acct-1") == {"t1", again.claimed[0].lease.task_id}


async def _held_is(server: Server, key: str, expected: set[str]) -> bool:
    return await slots_held(server, key) == expected


async def test_a_retry_frees_its_slot_and_takes_one_again_when_due(server: Server) -> None:
    await submit(server, keyed("t0", limit=1), keyed("t1", limit=1))
    session = open_worker(server)
    claim = await server.claim()
    assert claimed_ids(claim) == ["t0"]
    await session.settle(0, claim.leases)
    [lease] = claim.leases
    retry = worker_service_pb2.TaskOutcome(
        task_id="t0", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_RETRY
    )
    await server.core.connections._results(session, worker_service_pb2.Results(outcomes=[retry]))
    await until(lambda: _held_is(server, "acct-1", set()))


async def test_a_task_whose_worker_was_lost_keeps_its_slot_and_runs_again(server: Server) -> None:
    await submit(server, keyed("t0", limit=1), keyed("t1", limit=1))
    claim = await server.claim()
    await server.core.connections.dispatcher.record(claim.leases, "w1", claim.read)
    await server.broker.nack([lease.delivery for lease in claim.leases])  # its lease lapsed
    await server.core.connections._hold_back([(delivery, 0.0) for delivery, _ in claim.limited])
    again = await server.claim("w2")
    assert claimed_ids(again) == ["t0"], "the lost task runs again in its own slot; t1 still waits"
    assert await slots_held(server, "acct-1") == {"t0"}


async def test_a_full_key_frees_the_slots_of_tasks_no_longer_running(server: Server) -> None:
    await submit(server, keyed("t0"), keyed("t1"), keyed("t2"))
    claim = await server.claim()
    assert claimed_ids(claim) == ["t0", "t1"]
    await server.core.connections.dispatcher.record(claim.leases, "w1", claim.read)
    await server.core.canceller.cancel("t0")  # ended, its worker gone: nobody released the slot
    await server.core.connections._hold_back([(delivery, 0.0) for delivery, _ in claim.limited])
    waiting = await server.claim()
    assert waiting.claimed == [], "a slot taken moments ago is not taken back"
    await server.core.connections._hold_back([(delivery, 0.0) for delivery, _ in waiting.limited])
    server.clock.now += PRUNE_AFTER_SECONDS + 1
    await server.broker.recover_expired()
    deliveries = await server.broker.fetch(QUEUE, 100, 30.0, wait_seconds=2.0)
    again = await server.core.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert claimed_ids(again) == ["t2"]
    assert await slots_held(server, "acct-1") == {"t1", "t2"}


class RacingBackend(SharedBackend):
    """Group reads give way to other callers, so two replicas can both read before either adds."""

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        found = await super().members(group, after, limit)
        await asyncio.sleep(0)
        return found


async def test_two_replicas_racing_for_the_last_slot_never_both_keep_it() -> None:
    backend = RacingBackend()
    first, second = ConcurrencySlots(TaskStore(backend)), ConcurrencySlots(TaskStore(backend))
    assert await first.acquire([Slot("a", "k", 3), Slot("b", "k", 3)]) == [True, True]
    # Both find room and add at once: each sees the group over its limit (or, once the other
    # gave up, at it), and one that is over gives its slot up again.
    backend.meet_on_add(group_of("k"), 2)
    async with asyncio.timeout(5):
        granted = await asyncio.gather(first.acquire([Slot("c", "k", 3)]), second.acquire([Slot("d", "k", 3)]))
    kept = {task_id for task_id, [ok] in zip("cd", granted, strict=True) if ok}
    assert len(kept) <= 1
    assert set(await backend.members(group_of("k"))) == {"a", "b", *kept}
    if not kept:
        assert await first.acquire([Slot("c", "k", 3)]) == [True], "the slot is there for the next try"


async def test_a_task_held_back_by_its_rate_gives_its_slot_back(server: Server) -> None:
    await server.core.admin.set_rate_limit(rate_limit("work", "1/m"))
    await submit(server, keyed("t0"), keyed("t1"))
    claim = await server.claim()
    assert claimed_ids(claim) == ["t0"]
    assert await slots_held(server, "acct-1") == {"t0"}


# -- the submit rate limit charges per task --------------------------------------------------------

def group_of_tasks(size: int) -> task_service_pb2.SubmitRequest:
    members = [workflow_pb2.Workflow(task=task_pb2.Signature(name="noop")) for _ in range(size)]
    return task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(group=workflow_pb2.Group(members=members)))


def test_a_submission_counts_every_task_it_holds() -> None:
    link = task_pb2.Signature(name="cb", on_error=[task_pb2.Signature(name="cb2")])
    lone = task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="a", on_success=[link]))
    chord = workflow_pb2.Chord(header=group_of_tasks(4).workflow.group,
                               callback=workflow_pb2.Workflow(task=task_pb2.Signature(name="sum")))
    chain = workflow_pb2.Chain(steps=[workflow_pb2.Workflow(chord=chord), workflow_pb2.Workflow(task=link)])
    nested = task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(chain=chain))
    assert tasks_in([lone]) == 3
    assert tasks_in([nested]) == 4 + 1 + 2
    assert tasks_in([group_of_tasks(1000), lone]) == 1003
    assert tasks_in([task_service_pb2.SubmitRequest()]) == 0


def test_a_submission_counts_the_callbacks_of_chains_groups_and_chord_headers() -> None:
    def sigs(*names: str) -> list[task_pb2.Signature]:
        return [task_pb2.Signature(name=name) for name in names]

    header = group_of_tasks(2).workflow.group
    header.on_success.extend(sigs("ok"))
    header.on_error.extend(sigs("once"))
    header.on_member_error.extend(sigs("each"))
    grouped = task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(group=header))
    assert tasks_in([grouped]) == 2 + 3
    chord = workflow_pb2.Chord(header=header, callback=workflow_pb2.Workflow(task=task_pb2.Signature(name="sum")))
    then = task_pb2.Signature(name="ok", on_success=sigs("then"), on_error=sigs("ok-failed"))
    chain = workflow_pb2.Chain(steps=[workflow_pb2.Workflow(chord=chord)], on_success=[then], on_error=sigs("failed"))
    chained = task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(chain=chain))
    assert tasks_in([chained]) == (2 + 3 + 1) + 3 + 1
    with pytest.raises(ResourceExhausted, match="5 tasks can never fit"):
        SubmitRateLimiter(1, 4).take("web", tasks_in([grouped]))


def test_ten_submits_of_a_large_group_no_longer_pass_a_small_rate() -> None:
    limiter = SubmitRateLimiter(5, 5)
    with pytest.raises(ResourceExhausted, match="1000 tasks can never fit"):
        limiter.take("web", tasks_in([group_of_tasks(1000)]))
    limiter.take("web", tasks_in([group_of_tasks(5)]))
    with pytest.raises(ResourceExhausted, match="5 tasks/s"):
        limiter.take("web", tasks_in([group_of_tasks(2)]))
