"""Repair of lost messages (core/repair.py): the edges that tests/unit/test_repair.py and
tests/unit/test_repair_verdicts.py leave open, on the memory engines and on records built by hand.

- what a republished message carries; the counts a pass reports across queues and batches;
- forced repairs and the backoff of repeated repairs; two repairs of one task at once;
- the bounds of one automatic pass (buckets, tasks), which buckets are due, the claim per
  period that keeps replicas from repeating each other, the retirement of processed buckets;
- heartbeats marking leases live (`stamp_live_leases`): when, with what time, at what cost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor.values import seconds_of
from conveyor_server.backends.base import Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.core import publish_index, repair
from conveyor_server.core.publish_index import Bucket
from conveyor_server.core.publisher import decode_message
from conveyor_server.core.records import TaskStates
from conveyor_server.core.repair import RepairReport, eta_of, judge, last_sign_of_life, stamp_live_leases
from conveyor_server.core.store import Loaded, TaskStore
from tests.unit.test_durability import QUEUE, Clock, Outage, chord, lone, quick_repairs, submit, task
from tests.unit.test_repair import AFTER, CountsOnly, Rig, ids, repair_pass, rig, rig_on
from tests.unit.test_repair_verdicts import LEASE_AFTER, T0, record

__all__ = ["quick_repairs", "rig"]  # fixtures used by the tests below
OTHER = "other"


def elsewhere(task_id: str) -> task_pb2.Signature:
    return task_pb2.Signature(name="noop", id=task_id, queue=OTHER)


@pytest.fixture
async def counts_rig() -> AsyncIterator[Rig]:
    """The rig on a broker that cannot look messages up by id (AMQP, SQS)."""
    async for made in rig_on(CountsOnly()):
        yield made


async def lost_at(rig: Rig, seconds_from_now: float) -> None:
    """The index written and the repair's clock `seconds_from_now` in the future (for repair_now)."""
    await rig.core.repairer.index.flush()
    rig.clock.now = time.time() + seconds_from_now


async def registered(rig: Rig) -> list[Bucket]:
    index = rig.core.repairer.index
    return await index.buckets_until(time.time() + 1e6, begun=True)


async def repairs_of(rig: Rig, task_id: str) -> int:
    found = await rig.core.store.get(task_id)
    assert found is not None
    return found.repairs


# -- what a pass republishes and reports --------------------------------------------------------------


async def test_a_republished_message_is_the_tasks_first_attempt_in_its_workflow_naming_no_lease(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="p1")), chord([task(task_id="m0")], task(task_id="cb")))
    await rig.broker.purge(QUEUE)
    assert ids(await repair_pass(rig, 2 * AFTER)) == ["m0", "p1"]

    copies = {d.message_id: decode_message(d.body) for d in await rig.broker.fetch(QUEUE, 10, 30.0)}
    member = await rig.core.store.get("m0")
    assert member is not None and member.result.workflow_id
    assert copies.keys() == {"m0", "p1"}
    assert (copies["p1"].attempt, copies["p1"].workflow_id, copies["p1"].repairs_lease) == (1, "", "")
    assert (copies["m0"].attempt, copies["m0"].workflow_id, copies["m0"].repairs_lease) == (
        1, member.result.workflow_id, ""), "a queued task's copy replaces no lease"


async def test_a_pass_counts_the_held_backlogs_of_every_queue(rig: Rig) -> None:
    await submit(rig.core, *(lone(task(task_id=f"q{i}")) for i in range(2)),
                 *(lone(elsewhere(f"o{i}")) for i in range(3)))
    report = await repair_pass(rig, 2 * AFTER)
    assert (report.repaired, report.checked, report.held) == ([], 5, 5)


async def test_a_repair_reports_the_republished_tasks_of_every_queue(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="q0")), lone(elsewhere("o0")))
    await rig.broker.purge(QUEUE)
    await rig.broker.purge(OTHER)
    assert ids(await repair_pass(rig, 2 * AFTER)) == ["o0", "q0"]
    assert rig.broker.published == Counter({"q0": 2, "o0": 2})


async def test_from_counts_delayed_messages_count_as_held_in_every_queue(counts_rig: Rig) -> None:
    rig = counts_rig
    await submit(rig.core, *(lone(task(task_id=f"q{i}")) for i in range(2)))
    await rig.broker.purge(QUEUE)
    # Two messages wait delayed in that queue (handed back for a rate limit, say): as many as its candidates.
    await rig.broker.publish(QUEUE, [OutgoingMessage(f"later{i}", b"", delay=3600.0) for i in range(2)])
    await submit(rig.core, *(lone(elsewhere(f"o{i}")) for i in range(3)))

    report = await repair_pass(rig, 2 * AFTER)
    assert report.repaired == [] and report.held == 5, "2 delayed + 3 ready messages may be these 5 tasks"
    assert rig.broker.published["q0"] == 1


async def test_every_batch_of_a_repair_is_reported_dry_run_or_not(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repair, "LOAD_BATCH", 2)
    everyone = [f"t{i}" for i in range(5)]
    await submit(rig.core, *(lone(task(task_id=t)) for t in everyone))
    await rig.broker.purge(QUEUE)
    await lost_at(rig, 2 * AFTER)

    dry = await rig.core.repairer.repair_now(AFTER, dry_run=True)
    assert ids(dry) == everyone and set(rig.broker.published.values()) == {1}
    done = await rig.core.repairer.repair_now(AFTER)
    assert ids(done) == everyone and rig.broker.published == Counter(dict.fromkeys(everyone, 2))


# -- manual repairs -----------------------------------------------------------------------------------


async def test_a_forced_repair_skips_the_backoff_of_repeated_repairs_and_counts_each(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.broker.purge(QUEUE)
    await lost_at(rig, 2 * AFTER)
    repairer = rig.core.repairer
    assert ids(await repairer.repair_now(AFTER)) == ["t1"]
    await rig.broker.purge(QUEUE)  # its copy is lost too

    backing_off = await repairer.repair_now(AFTER)
    assert backing_off.repaired == [] and backing_off.checked == 1, "repaired a moment ago: not again yet"
    forced = await repairer.repair_now(AFTER, force=True)
    assert ids(forced) == ["t1"] and forced.repaired[0].record.repairs == 2
    assert await repairs_of(rig, "t1") == 2 and rig.broker.published["t1"] == 3


async def test_a_pass_carries_a_task_repaired_a_moment_ago_to_the_end_of_its_backoff(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.broker.purge(QUEUE)
    await lost_at(rig, 2 * AFTER)
    assert ids(await rig.core.repairer.repair_now(AFTER)) == ["t1"]
    await rig.core.repairer.index.flush()
    await rig.broker.purge(QUEUE)  # its copy is lost too

    report = await rig.core.repairer.repair_due()
    assert (report.repaired, report.checked, report.carried) == ([], 1, 1), "waits out its backoff, watched"
    assert rig.broker.published["t1"] == 2


async def test_a_task_repaired_by_another_pass_meanwhile_is_not_republished_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.broker.purge(QUEUE)
    await lost_at(rig, 2 * AFTER)
    load = rig.core.store.load
    started: list[bool] = []
    raced: list[RepairReport] = []

    async def racing_load(task_ids: Sequence[str]) -> dict[str, Loaded]:
        found = await load(task_ids)
        if not started:  # once: the reconciler's pass repairs t1 between this repair's read and its republish
            started.append(True)
            raced.append(await rig.core.repairer.repair_due())
        return found

    monkeypatch.setattr(rig.core.store, "load", racing_load)
    report = await rig.core.repairer.repair_now(AFTER)
    assert [ids(r) for r in raced] == [["t1"]]
    assert report.repaired == [] and rig.broker.published["t1"] == 2
    assert await repairs_of(rig, "t1") == 1


async def test_a_manual_repair_carries_nothing_forward(rig: Rig) -> None:
    await submit(rig.core, lone(task(task_id="t1")))
    await lost_at(rig, 2 * AFTER)
    before = await registered(rig)
    report = await rig.core.repairer.repair_now(AFTER)
    assert (report.repaired, report.held, report.carried) == ([], 1, 0)
    assert await registered(rig) == before


async def test_a_manual_repair_looks_into_the_buckets_not_ended_yet(rig: Rig) -> None:
    at = time.time() + 1.0
    rig.clock.now = at
    rig.core.repairer.index.clock = rig.clock  # this publish lands in the bucket of `at`, which has not ended
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.core.repairer.index.flush()
    report = await rig.core.repairer.repair_now(0.0, force=True)
    assert ids(report) == ["t1"] and rig.broker.published["t1"] == 2


async def test_a_manual_repair_has_written_the_republished_tasks_into_the_index_when_it_returns(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_index, "FLUSH_SECONDS", 3600.0)  # only explicit flushes write
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.broker.purge(QUEUE)
    await lost_at(rig, 2 * AFTER)
    writes = rig.backend.index_writes
    assert ids(await rig.core.repairer.repair_now(AFTER)) == ["t1"]
    assert rig.backend.index_writes == writes + 1


# -- the automatic pass -------------------------------------------------------------------------------


async def in_three_buckets(rig: Rig) -> list[Bucket]:
    """Three tasks published into three consecutive old buckets; the buckets."""
    seconds = rig.core.repairer.index.bucket_seconds
    index_clock = Clock((int(time.time()) // 600) * 600 - 1200.0)
    rig.core.repairer.index.clock = index_clock
    buckets = []
    for i in range(3):
        await submit(rig.core, lone(task(task_id=f"t{i}")))
        buckets.append(Bucket.at(index_clock.now, seconds))
        index_clock.now += seconds
    await rig.core.repairer.index.flush()
    return buckets


async def test_a_pass_takes_at_most_max_buckets_per_pass_oldest_first(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repair, "MAX_BUCKETS_PER_PASS", 2)
    buckets = await in_three_buckets(rig)
    report = await repair_pass(rig, 2 * AFTER)
    assert report.checked == 2
    left = await registered(rig)
    assert buckets[2] in left and buckets[0] not in left and buckets[1] not in left


async def test_a_pass_stops_taking_buckets_once_it_has_max_tasks_per_pass(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repair, "MAX_TASKS_PER_PASS", 2)
    buckets = await in_three_buckets(rig)
    report = await repair_pass(rig, 2 * AFTER)
    assert report.checked == 2
    assert buckets[2] in await registered(rig)


async def test_a_bucket_waits_until_it_ended_repair_after_ago_and_leaves_the_registry_once_processed(
    rig: Rig,
) -> None:
    at = time.time() + 10 * AFTER
    rig.core.repairer.index.clock = lambda: at - AFTER  # ends within the last repair_after before `at`
    await submit(rig.core, lone(task(task_id="t1")))
    await rig.core.repairer.index.flush()
    [bucket] = await registered(rig)

    rig.clock.now = at
    assert await rig.core.repairer.repair_due() == RepairReport()
    assert await registered(rig) == [bucket]
    rig.clock.now = at + AFTER
    report = await rig.core.repairer.repair_due()
    assert (report.checked, report.held, report.carried) == (1, 1, 1)
    assert bucket not in await registered(rig), "processed: retired (its task carried into a later bucket)"


@pytest.mark.parametrize("repair_after", [AFTER, 4.0])
async def test_a_bucket_claimed_by_a_pass_that_died_is_taken_over_the_next_quarter_of_repair_after(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, repair_after: float
) -> None:
    repairer = rig.core.repairer
    repairer.repair_after = repair_after
    period = max(repair_after / 4, 1.0)
    await submit(rig.core, lone(task(task_id="t1")))
    await repairer.index.flush()
    base = (int(time.time()) // 1200 + 1) * 1200.0  # a round time: periods of several lengths begin there

    async def dies(_: Sequence[Bucket]) -> None:
        raise Outage("the replica went away before retiring its buckets (injected)")

    with monkeypatch.context() as patched:
        patched.setattr(repairer.index, "retire", dies)
        rig.clock.now = base + 0.05 * period
        with pytest.raises(Outage):
            await repairer.repair_due()
    rig.clock.now = base + 0.95 * period
    assert (await repairer.repair_due()).checked == 0, "claimed for this period"
    rig.clock.now = base + 1.05 * period
    assert (await repairer.repair_due()).checked == 1, "the next period's pass takes it over"


async def test_a_pass_logs_held_backlogs_as_info_and_republished_tasks_as_warnings(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=repair.__name__)
    await submit(rig.core, lone(task(task_id="t1")))
    held = await repair_pass(rig, 2 * AFTER)
    assert (held.repaired, held.held) == ([], 1)
    assert [r.levelno for r in caplog.records if r.name == repair.__name__] == [logging.INFO]

    caplog.clear()
    await rig.broker.purge(QUEUE)
    assert ids(await repair_pass(rig, 4 * AFTER)) == ["t1"]
    assert [r.levelno for r in caplog.records if r.name == repair.__name__] == [logging.WARNING]


# -- heartbeats mark long tasks' leases live ----------------------------------------------------------

LEASE = "lease-1"  # the lease token of record() (test_repair_verdicts)


class ReadCounting(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        self.reads += 1
        return await super().get(keys)


def running(task_id: str) -> records_pb2.TaskRecord:
    """A started task, last changed at T0 and never renewed, under lease LEASE."""
    made = record(TaskStates.TASK_STATE_STARTED, changed=T0)
    made.result.task_id = task_id
    return made


@pytest.fixture
async def backend() -> AsyncIterator[ReadCounting]:
    made = ReadCounting()
    await made.connect()
    yield made
    await made.close()


async def created(backend: ReadCounting, *records: records_pb2.TaskRecord) -> TaskStore:
    """The records written by another process; a store of this one (which remembers none of them)."""
    assert await TaskStore(backend).create(records) == []
    return TaskStore(backend)


async def test_a_heartbeat_marks_a_lease_live_from_half_of_repair_after_without_reading_the_record_again(
    backend: ReadCounting,
) -> None:
    store = await created(backend, running("t1"))
    loaded = await store.load(["t1"])
    leases = [("t1", LEASE), ("gone", "lease-x")]  # a task whose record was not found is left out

    await stamp_live_leases(store, leases, loaded, AFTER, at=T0 + AFTER / 2 - 0.5)
    assert (await store.load(["t1"]))["t1"] == loaded["t1"], "not yet: nothing written"

    reads = backend.reads
    await stamp_live_leases(store, leases, loaded, AFTER, at=T0 + AFTER / 2)
    assert backend.reads == reads, "written from the records the heartbeat read"
    stamped = (await store.load(["t1"]))["t1"]
    assert stamped.version == loaded["t1"].version + 1
    assert seconds_of(stamped.record.lease_renewed_at) == T0 + AFTER / 2


async def test_a_heartbeat_given_no_time_marks_the_lease_live_now(backend: ReadCounting) -> None:
    store = await created(backend, running("t1"))
    loaded = await store.load(["t1"])
    before = time.time()
    await stamp_live_leases(store, [("t1", LEASE)], loaded, AFTER)
    renewed = seconds_of((await store.load(["t1"]))["t1"].record.lease_renewed_at)
    assert before - 0.001 <= renewed <= time.time()


async def test_a_heartbeat_for_a_lease_replaced_since_its_read_writes_nothing(backend: ReadCounting) -> None:
    store = await created(backend, running("t1"))
    stale = await store.load(["t1"])

    def replace_lease(_: str, found: records_pb2.TaskRecord) -> bool:
        found.lease_token = "lease-2"  # another worker's lease now (after a repair, say)
        return True

    await TaskStore(backend).update(["t1"], replace_lease)
    await stamp_live_leases(store, [("t1", LEASE)], stale, AFTER, at=T0 + 10 * AFTER)
    now = (await store.load(["t1"]))["t1"]
    assert now.version == stale["t1"].version + 1, "only the lease's replacement was written"
    assert now.record.lease_token == "lease-2" and not now.record.HasField("lease_renewed_at")


# -- verdicts ---------------------------------------------------------------------------------------------


def test_judge_backs_off_repeated_repairs_unless_told_not_to() -> None:
    made = record(changed=T0, repaired_at=T0 + 100)
    made.repairs = 1
    verdict = judge(made, T0, AFTER, LEASE_AFTER)
    assert verdict is not None and verdict.due == T0 + 100 + AFTER


def test_no_eta_reads_as_zero_and_a_running_record_with_no_times_showed_life_at_zero() -> None:
    assert eta_of(record()) == 0.0
    assert last_sign_of_life(record(TaskStates.TASK_STATE_STARTED)) == 0.0
