"""Repair of lost messages (core/repair.py, core/publish_index.py) on the memory engines.

A broker "loses" messages the way a flushed Redis or a deleted queue does: `purge()` drops the
queued ones without ending their tasks, and an ack of a leased delivery without a result drops
one in flight. Time: every publish is indexed into a bucket long gone (the index's clock runs
1000 s behind), so the repair's own clock (`Rig.clock`) alone decides what looks lost; a record
is made to look old by moving its timestamps back (`backdate`), as a heartbeat sees wall time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2, task_pb2, worker_service_pb2
from conveyor_server import cli
from conveyor_server.app import ConveyorServer, Core
from conveyor_server.config import ConfigError, Settings
from conveyor_server.core import publish_index, repair
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.publish_index import BUCKET_PREFIX
from conveyor_server.core.repair import RepairReport, with_repair_after
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import Loaded
from tests.unit.replicas import lease_all, outcome
from tests.unit.test_durability import (
    QUEUE,
    Clock,
    FlakyBackend,
    FlakyBroker,
    chord,
    lone,
    quick_repairs,
    submit,
    task,
    work,
)

__all__ = ["quick_repairs"]  # fixture used by the tests below
AFTER = 60.0
HEARTBEAT = worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())


class CountingBackend(FlakyBackend):
    """Counts the members written to the publish index's buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.index_writes = 0

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        if group.startswith(BUCKET_PREFIX):
            self.index_writes += 1
        return await super().add_member(group, member, payload, keep)


@dataclass
class Rig:
    core: Core
    broker: FlakyBroker
    backend: CountingBackend
    clock: Clock


def settings(**changes: object) -> Settings:
    return Settings(broker_url="memory://", backend_url="memory://", repair_after_seconds=AFTER,
                    reconcile_interval_seconds=3600.0).replace(**changes)


def build(broker: FlakyBroker, backend: CountingBackend, config: Settings | None = None) -> Rig:
    core = Core.build(config or settings(), broker, backend)
    clock = Clock(time.time())
    core.repairer.clock = clock
    core.repairer.index.clock = lambda: time.time() - 1000  # publishes land in long-gone buckets
    return Rig(core, broker, backend, clock)


async def rig_on(broker: FlakyBroker) -> AsyncIterator[Rig]:
    """The rig on `broker` and a CountingBackend, connected, closed after."""
    backend = CountingBackend()
    await broker.connect()
    await backend.connect()
    yield build(broker, backend)
    await broker.close()
    await backend.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for made in rig_on(FlakyBroker()):
        yield made


async def repair_pass(rig: Rig, seconds_from_now: float) -> RepairReport:
    """One reconciler pass of the repair, `seconds_from_now` in the future."""
    await rig.core.repairer.index.flush()
    rig.clock.now = time.time() + seconds_from_now
    return await rig.core.repairer.repair_due()


def ids(report: RepairReport) -> list[str]:
    return sorted(r.record.result.task_id for r in report.repaired)


async def run_everything(core: Core) -> Counter[str]:
    """Run whatever is ready (and what it leads to) to success; executions per task id."""
    ran: Counter[str] = Counter()
    for _ in range(20):
        run = await work(core)
        if not run.fetched:
            break
        ran.update(lease.task_id for lease in run.leases)
    return ran


async def state(core: Core, task_id: str) -> str:
    record = await core.store.get(task_id)
    assert record is not None
    return result_pb2.TaskState.Name(record.result.state)


async def backdate(core: Core, task_id: str, seconds: float) -> None:
    """Move every time the record holds `seconds` into the past."""

    def shift(_: str, record: records_pb2.TaskRecord) -> bool:
        stamps = [record.enqueued_at, record.retry_at, record.lease_renewed_at, record.result.submitted_at,
                  *(entry.at for entry in record.result.history)]
        for stamp in stamps:
            if stamp.seconds:
                stamp.seconds -= int(seconds)
        return True

    await core.store.update([task_id], shift)


# -- queued tasks ----------------------------------------------------------------------------------


async def test_a_queued_task_whose_message_was_lost_is_republished_once_and_runs_once(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")), lone(task(task_id="t2")))
    await rig.broker.purge(QUEUE)  # the broker loses both messages; their tasks stay PENDING

    young = await repair_pass(rig, AFTER / 2)
    assert young.repaired == [] and young.checked == 2, "nothing is repaired before repair_after"
    repaired = await repair_pass(rig, 2 * AFTER)
    assert ids(repaired) == ["t1", "t2"]
    assert [r.record.repairs for r in repaired.repaired] == [1, 1]
    assert rig.broker.published == Counter({"t1": 2, "t2": 2})

    again = await repair_pass(rig, 4 * AFTER)
    assert again.repaired == [] and again.held == 2, "their copies are in the queue now: left alone"
    assert await run_everything(rig.core) == Counter({"t1": 1, "t2": 1})
    assert [await state(rig.core, t) for t in ("t1", "t2")] == ["TASK_STATE_SUCCESS"] * 2
    assert (await repair_pass(rig, 8 * AFTER)).checked == 0, "ended tasks leave the index"


async def test_a_backlog_older_than_repair_after_is_not_republished(rig: Rig) -> None:
    await submit(rig.core, *(lone(task(task_id=f"t{i}")) for i in range(5)))
    report = await repair_pass(rig, 2 * AFTER)
    assert report.repaired == [] and report.held == 5, "5 ready messages may be these 5 tasks"
    assert set(rig.broker.published.values()) == {1}
    assert await run_everything(rig.core) == Counter({f"t{i}": 1 for i in range(5)})


async def test_only_the_candidates_whose_messages_are_missing_are_republished_and_each_runs_once(rig: Rig) -> None:
    await submit(rig.core, *(lone(task(task_id=f"t{i}")) for i in range(4)))
    lost = await rig.broker.fetch(QUEUE, 2, 30.0)
    await rig.broker.ack(lost)  # two messages vanish in flight, before any worker got them

    report = await repair_pass(rig, 2 * AFTER)
    assert ids(report) == ["t0", "t1"] and report.held == 2, "the broker still holds t2's and t3's messages"
    assert rig.broker.published == Counter({"t0": 2, "t1": 2, "t2": 1, "t3": 1})
    assert await run_everything(rig.core) == Counter({f"t{i}": 1 for i in range(4)})
    stats = await rig.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (0, 0)


class CountsOnly(FlakyBroker):
    """A broker that cannot look messages up by id, as AMQP and SQS cannot."""

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        return None


@pytest.mark.parametrize("leased", [0, 2])
async def test_from_counts_all_candidates_are_republished_only_when_fewer_messages_than_candidates_are_held(
    leased: int,
) -> None:
    broker, backend = CountsOnly(), CountingBackend()
    rig = build(broker, backend)
    await submit(rig.core, *(lone(task(task_id=f"t{i}")) for i in range(4)))
    pumped = await broker.fetch(QUEUE, 2, 30.0)  # leased by a pump, not yet dispatched: still PENDING
    await broker.ack(pumped[leased:])  # and those beyond `leased` vanish

    report = await repair_pass(rig, 2 * AFTER)
    if leased:
        assert report.repaired == [] and report.held == 4, "2 ready + 2 leased may be these 4 tasks"
    else:
        assert ids(report) == ["t0", "t1", "t2", "t3"], "2 messages for 4 candidates: some are missing"
        assert await run_everything(rig.core) == Counter({f"t{i}": 1 for i in range(4)}), "copies are dropped"


async def test_a_task_is_never_republished_before_its_eta(rig: Rig) -> None:
    eta = time.time() + 3600
    signature = task(task_id="later")
    signature.eta.FromNanoseconds(int(eta * 1e9))
    await submit(rig.core, lone(signature))
    await rig.broker.purge(QUEUE)

    assert (await repair_pass(rig, 2 * AFTER)).checked == 0, "its index bucket is the ETA's"
    await rig.core.repairer.index.flush()
    rig.clock.now = eta - 1
    forced = await rig.core.repairer.repair_now(0.0, force=True)
    assert forced.repaired == [] and forced.checked == 1, "not even a forced repair before the ETA"

    assert ids(await repair_pass(rig, 3600 + 2 * AFTER)) == ["later"]
    assert await run_everything(rig.core) == Counter({"later": 1})


async def test_a_retry_whose_delayed_message_was_lost_runs_its_next_attempt(rig: Rig) -> None:
    retry = task_pb2.RetryPolicy(max_attempts=3, initial=Duration(nanos=1_000_000))
    await submit(rig.core, lone(task(task_id="r1", retry=retry)))
    failed = await work(rig.core, worker_service_pb2.OUTCOME_FAILURE, error="Boom")
    assert failed.requeued.keys() == {"r1"}
    await rig.broker.purge(QUEUE)  # the retry's delayed message is lost
    assert await state(rig.core, "r1") == "TASK_STATE_RETRY"
    await backdate(rig.core, "r1", AFTER / 2)  # its retry was due a while ago

    assert (await repair_pass(rig, 0)).repaired == [], "not before repair_after past its retry time"
    assert ids(await repair_pass(rig, 2 * AFTER)) == ["r1"]
    assert await run_everything(rig.core) == Counter({"r1": 1})
    record = await rig.core.store.get("r1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_SUCCESS and record.result.attempts == 2


async def test_a_lost_chords_members_are_republished_and_its_callback_fires_once(rig: Rig) -> None:
    await submit(rig.core, chord([task(task_id=f"m{i}") for i in range(3)], task(task_id="cb")))
    await rig.broker.purge(QUEUE)
    assert ids(await repair_pass(rig, 2 * AFTER)) == ["m0", "m1", "m2"]
    assert await run_everything(rig.core) == Counter({"m0": 1, "m1": 1, "m2": 1, "cb": 1})
    assert rig.broker.published["cb"] == 1
    assert await state(rig.core, "cb") == "TASK_STATE_SUCCESS"


async def test_a_chord_callback_whose_publish_failed_is_republished_when_its_members_message_is_lost(
    rig: Rig,
) -> None:
    await submit(rig.core, chord([task(task_id="m0")], task(task_id="cb")))
    rig.broker.fail_publishes = 1  # the broker goes away as the last member's follow-up goes out
    await work(rig.core)
    assert await state(rig.core, "m0") == "TASK_STATE_SUCCESS" and rig.broker.published["cb"] == 0
    await rig.broker.purge(QUEUE)  # the member's message was handed back into a queue that is lost

    assert ids(await repair_pass(rig, 2 * AFTER)) == ["cb"], "the claimed, unpublished callback is found"
    assert await run_everything(rig.core) == Counter({"cb": 1})
    assert await state(rig.core, "cb") == "TASK_STATE_SUCCESS"


# -- running tasks ---------------------------------------------------------------------------------


async def test_a_running_task_whose_lease_shows_no_sign_of_life_is_taken_over_by_the_repair(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    first = await lease_all(rig.core, "w1")
    await rig.broker.ack([first.leases[0].delivery])  # the message vanishes while w1 holds it
    await backdate(rig.core, "t1", 2 * AFTER)  # and no heartbeat said w1 still runs it since

    report = await repair_pass(rig, 0)
    assert ids(report) == ["t1"] and report.repaired[0].record.result.state == result_pb2.TASK_STATE_RECEIVED
    dispatcher, recorder = rig.core.connections.dispatcher, rig.core.connections.recorder
    second = await dispatcher.claim(await rig.broker.fetch(QUEUE, 10, 30.0), "w2", time.monotonic())
    assert [lease.task_id for lease in second.leases] == ["t1"] and not second.duplicates
    await dispatcher.record(second.replacing, "w2", second.read)

    stale = await recorder.record([outcome(first, "t1")], "w1")
    assert stale.statuses["t1"] == worker_service_pb2.ACK_STATUS_STALE_LEASE, "the lease the repair replaced is refused"
    fresh = await recorder.record([outcome(second, "t1")], "w2")
    assert fresh.statuses["t1"] == worker_service_pb2.ACK_STATUS_ACCEPTED
    assert await state(rig.core, "t1") == "TASK_STATE_SUCCESS"


async def running_in_a_session(rig: Rig, task_id: str) -> tuple[WorkerSession, list[Lease]]:
    """A worker session holding the lease of `task_id` (RECEIVED written)."""
    await submit(rig.core, lone(task(task_id=task_id)))
    session = rig.core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claim = await lease_all(rig.core, "w1")
    await session.settle(0, claim.leases)
    return session, list(claim.leases)


async def test_heartbeats_keep_a_long_tasks_lease_live_and_short_tasks_never_pay(rig: Rig) -> None:
    session, _ = await running_in_a_session(rig, "t1")
    before = (await rig.core.store.load(["t1"]))["t1"].version
    await rig.core.connections._handle(session, HEARTBEAT)
    assert (await rig.core.store.load(["t1"]))["t1"].version == before, "a fresh lease writes nothing"

    await backdate(rig.core, "t1", 2 * AFTER)  # a long task: received long ago
    await rig.core.connections._handle(session, HEARTBEAT)
    record = await rig.core.store.get("t1")
    assert record is not None and record.lease_renewed_at.seconds >= int(time.time()) - 1

    report = await repair_pass(rig, AFTER / 2)
    assert report.repaired == [] and report.carried == 1, "its lease is live: checked again later"
    assert rig.broker.published["t1"] == 1
    await session.close()


async def test_a_repair_copy_is_dropped_when_the_lease_it_replaces_was_renewed_since(rig: Rig) -> None:
    session, leases = await running_in_a_session(rig, "t1")
    await rig.broker.ack([leases[0].delivery])
    await backdate(rig.core, "t1", 2 * AFTER)
    assert ids(await repair_pass(rig, 0)) == ["t1"]

    await rig.core.connections._handle(session, HEARTBEAT)  # w1 was alive after all
    dispatcher = rig.core.connections.dispatcher
    claim = await dispatcher.claim(await rig.broker.fetch(QUEUE, 10, 30.0), "w2", time.monotonic())
    assert claim.claimed == [] and len(claim.duplicates) == 1, "w1 keeps its lease"
    await dispatcher.drop_unrunnable(claim)
    record = await rig.core.store.get("t1")
    assert record is not None and record.lease_token == leases[0].token
    await session.close()


async def test_a_forced_repair_of_a_task_not_lost_makes_a_copy_that_dispatch_drops(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.core.repairer.index.flush()
    rig.clock.now = time.time()
    report = await rig.core.repairer.repair_now(0.0, force=True)
    assert ids(report) == ["t1"] and rig.broker.published["t1"] == 2
    assert await run_everything(rig.core) == Counter({"t1": 1})


# -- the index -------------------------------------------------------------------------------------


async def test_the_index_costs_at_most_one_write_per_publish_call_and_none_on_the_callers_path(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_index, "FLUSH_SECONDS", 3600.0)  # only the explicit flush below writes
    await submit(rig.core, *(lone(task(task_id=f"b{i}")) for i in range(100)))
    for i in range(10):
        await submit(rig.core, lone(task(task_id=f"s{i}")))
    assert rig.backend.index_writes == 0, "submits returned without waiting for an index write"
    await rig.core.repairer.index.flush()
    assert rig.backend.index_writes == 1, "11 publish calls within one flush share one write"
    tasks = await rig.core.repairer.index.tasks(await rig.core.repairer.index.buckets_until(time.time()))
    assert len(tasks) == 110 and set(tasks.values()) == {QUEUE}


def test_repair_after_defaults_to_four_leases_and_must_exceed_two_heartbeats() -> None:
    assert with_repair_after(Settings(lease_seconds=30)).repair_after_seconds == 120
    assert with_repair_after(Settings(repair_after_seconds=11)).repair_after_seconds == 11
    with pytest.raises(ConfigError, match="must exceed two heartbeat intervals"):
        with_repair_after(Settings(repair_after_seconds=10, heartbeat_interval_seconds=5))


# -- the RPC and the CLI ---------------------------------------------------------------------------


@pytest.fixture
async def serving(rig: Rig) -> AsyncIterator[str]:
    # No dashboard (http_port=0): its uvicorn loop ticks every 0.1 s, so stopping it takes that long.
    server = ConveyorServer(rig.core.settings.replace(port=0, http_port=0), core=rig.core)
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)


async def conveyor(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_conveyor_repair_dry_run_lists_what_it_would_republish_and_changes_nothing(
    rig: Rig, serving: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await submit(rig.core, lone(task(task_id="t1")), lone(task(task_id="t2")))
    await rig.broker.purge(QUEUE)
    await rig.core.repairer.index.flush()
    rig.clock.now = time.time() + 90

    assert await conveyor("--address", serving, "repair", "--older-than", "1m", "--dry-run") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out[:2]] == [[t, "noop", QUEUE, "PENDING"] for t in ("t1", "t2")]
    assert out[0].split()[4].startswith("1m"), out
    assert out[-1] == "would republish 2 tasks (2 live tasks checked)"
    assert set(rig.broker.published.values()) == {1}
    record = await rig.core.store.get("t1")
    assert record is not None and record.repairs == 0

    assert await conveyor("--address", serving, "repair", "--older-than", "1m", "--queue", QUEUE) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "republished 2 tasks (2 live tasks checked)"
    assert rig.broker.published == Counter({"t1": 2, "t2": 2})


async def test_conveyor_repair_refuses_bad_ages_clearly(
    rig: Rig, serving: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await conveyor("--address", serving, "repair", "--older-than=-5m") == 1
    assert "INVALID_ARGUMENT: older_than must be a duration of 0 s or more, got -300 s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        await conveyor("--address", serving, "repair", "--older-than", "10x")
    assert usage.value.code == 2
    assert "'10x' is not a duration" in capsys.readouterr().err

    async with grpc.aio.insecure_channel(serving) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        for request, message in [
            (admin_service_pb2.RepairTasksRequest(), "older_than is required"),
            (admin_service_pb2.RepairTasksRequest(older_than=Duration(seconds=60), queue="no spaces"),
             "invalid queue name"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.RepairTasks(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (refused.value.details() or "")


def parsed(values: Sequence[str]) -> list[float]:
    return [cli.parse_duration(v) for v in values]


def test_ages_are_read_in_the_units_operators_write() -> None:
    assert parsed(["90", "90s", "10m", "1h30m", "2d", "250ms", "-5m"]) == [90, 90, 600, 5400, 172800, 0.25, -300]
    assert [cli.format_age(s) for s in (5.25, 65, 3725, 90000)] == ["5.2s", "1m05s", "1h02m", "1d01h"]


async def test_a_held_backlog_is_carried_without_its_records_being_read(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(rig.core, *(lone(task(task_id=f"t{i:02}")) for i in range(50)))
    vanished = await rig.broker.fetch(QUEUE, 5, 30.0)
    await rig.broker.ack(vanished)  # five messages vanish in flight; the other 45 wait in the queue
    lost = sorted(delivery.message_id for delivery in vanished)
    read: list[str] = []
    load = rig.core.store.load

    async def counting_load(task_ids: Sequence[str]) -> dict[str, Loaded]:
        read.extend(task_ids)
        return await load(task_ids)

    monkeypatch.setattr(rig.core.store, "load", counting_load)
    report = await repair_pass(rig, 2 * AFTER)
    assert ids(report) == lost
    assert sorted(set(read)) == lost, "only the tasks whose messages the queue lacks are read"
    assert (report.held, report.carried, report.checked) == (45, 45, 50)
    assert await run_everything(rig.core) == Counter({f"t{i:02}": 1 for i in range(50)})


async def test_a_bucket_is_repaired_a_part_at_a_time_and_every_part_is_done_in_one_pass(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bucket may hold a million queued tasks: a pass holds one part's ids, never the bucket's.
    monkeypatch.setattr(repair, "MAX_TASKS_PER_PASS", 3)
    for n in range(4):  # four index members of two tasks each, all in one bucket
        await submit(rig.core, lone(task(task_id=f"t{n}a")), lone(task(task_id=f"t{n}b")))
        await rig.core.repairer.index.flush()
    await rig.broker.purge(QUEUE)
    parts: list[int] = []
    original = rig.core.repairer._repair

    async def spy(tasks: Mapping[str, str], *args: Any, **kwargs: Any) -> RepairReport:
        parts.append(len(tasks))
        return await original(tasks, *args, **kwargs)

    monkeypatch.setattr(rig.core.repairer, "_repair", spy)
    report = await repair_pass(rig, 2 * AFTER)
    assert ids(report) == sorted(f"t{n}{s}" for n in range(4) for s in "ab")
    assert parts == [4, 4], "whole members, about MAX_TASKS_PER_PASS ids a part"
    assert await run_everything(rig.core) == Counter({f"t{n}{s}": 1 for n in range(4) for s in "ab"})
