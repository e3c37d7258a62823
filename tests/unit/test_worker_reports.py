"""The Python worker's reports (conveyor.reports): STARTED and result batching, and the results
held until the server acks them. On a real event loop; batches are awaited, not slept for."""

from __future__ import annotations

import asyncio

import pytest

from conveyor import reports
from conveyor.pools.base import make_pool
from conveyor.reports import RESULT_LINGER_SECONDS, ResultBatcher, StartedBatcher, UnackedResults
from conveyor.v1 import task_pb2, worker_service_pb2
from conveyor.worker import Worker
from tests.support.processes import until


def assignment(task_id: str) -> worker_service_pb2.Assignment:
    return worker_service_pb2.Assignment(task=task_pb2.Signature(id=task_id, name="t"), lease_token=f"lease-{task_id}")


def outcome(task_id: str, lease: str = "") -> worker_service_pb2.TaskOutcome:
    return worker_service_pb2.TaskOutcome(
        task_id=task_id, lease_token=lease or f"lease-{task_id}", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )


def started_ids(sent: list[worker_service_pb2.ConnectRequest]) -> list[list[str]]:
    return [[ref.task_id for ref in message.started.tasks] for message in sent]


def result_ids(sent: list[worker_service_pb2.ConnectRequest]) -> list[list[str]]:
    return [[o.task_id for o in message.results.outcomes] for message in sent]


async def test_tasks_that_start_together_are_reported_in_one_started_message() -> None:
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = StartedBatcher(sent.append)
    batcher.started(assignment("a"))
    batcher.started(assignment("b"))
    assert sent == []
    await until(lambda: sent, 5.0, "the Started batch went out")
    assert started_ids(sent) == [["a", "b"]]
    assert sent[0].started.tasks[0].lease_token == "lease-a"


async def test_a_task_that_ends_before_its_report_is_never_reported_started() -> None:
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = StartedBatcher(sent.append)
    batcher.started(assignment("quick"))
    batcher.started(assignment("slow"))
    batcher.ended("quick")
    await until(lambda: sent, 5.0, "the Started batch went out")
    assert started_ids(sent) == [["slow"]]
    batcher.started(assignment("only"))
    batcher.ended("only")
    batcher.flush()
    assert len(sent) == 1  # nothing left to report


async def test_a_result_with_nothing_else_running_goes_out_in_the_next_loop_iteration() -> None:
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = ResultBatcher(sent.append)
    batcher.add(outcome("a"), others_running=False, batch_size=8)
    batcher.add(outcome("b"), others_running=False, batch_size=8)  # ended in the same iteration
    assert sent == []
    await asyncio.sleep(0)
    assert result_ids(sent) == [["a", "b"]]


async def test_a_result_lingers_for_running_tasks_to_share_its_message() -> None:
    loop = asyncio.get_running_loop()
    sent: list[worker_service_pb2.ConnectRequest] = []
    sent_at: list[float] = []

    def send(message: worker_service_pb2.ConnectRequest) -> None:
        sent.append(message)
        sent_at.append(loop.time())

    batcher = ResultBatcher(send)
    began = loop.time()
    batcher.add(outcome("a"), others_running=True, batch_size=8)
    batcher.add(outcome("b"), others_running=True, batch_size=8)
    await until(lambda: sent, 5.0, "the lingering batch went out")
    assert sent_at[0] - began >= RESULT_LINGER_SECONDS
    assert result_ids(sent) == [["a", "b"]]


async def test_a_full_batch_goes_out_without_lingering() -> None:
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = ResultBatcher(sent.append)
    batcher.add(outcome("a"), others_running=True, batch_size=2)
    batcher.add(outcome("b"), others_running=True, batch_size=2)
    await asyncio.sleep(0)
    assert result_ids(sent) == [["a", "b"]]
    await asyncio.sleep(RESULT_LINGER_SECONDS * 5)  # the cancelled linger sends nothing more
    assert len(sent) == 1


async def test_a_result_lingers_longer_while_a_backlog_keeps_every_slot_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "RESULT_LINGER_SECONDS", 0.001)
    monkeypatch.setattr(reports, "RESULT_BACKLOG_LINGER_SECONDS", 0.2)
    loop = asyncio.get_running_loop()
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = ResultBatcher(sent.append)
    began = loop.time()
    batcher.add(outcome("a"), others_running=True, batch_size=8, backlog=True)
    await asyncio.sleep(0.05)
    assert sent == [], "held well past the short linger"
    batcher.add(outcome("b"), others_running=True, batch_size=8, backlog=True)
    await until(lambda: sent, 5.0, "the batch went out")
    assert loop.time() - began >= 0.2
    assert result_ids(sent) == [["a", "b"]]


async def test_a_result_without_a_backlog_cuts_a_long_linger_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "RESULT_BACKLOG_LINGER_SECONDS", 30.0)
    sent: list[worker_service_pb2.ConnectRequest] = []
    batcher = ResultBatcher(sent.append)
    batcher.add(outcome("a"), others_running=True, batch_size=8, backlog=True)
    batcher.add(outcome("b"), others_running=True, batch_size=8, backlog=False)  # the backlog is gone
    await asyncio.wait_for(until(lambda: sent, 5.0, "the batch went out"), 5.0)
    assert result_ids(sent) == [["a", "b"]]
    batcher.add(outcome("c"), others_running=True, batch_size=8, backlog=False)
    batcher.add(outcome("d"), others_running=True, batch_size=8, backlog=True)  # keeps the earlier deadline
    await asyncio.wait_for(until(lambda: len(sent) == 2, 5.0, "the second batch went out"), 5.0)
    assert result_ids(sent[1:]) == [["c", "d"]]


def test_an_ack_releases_only_the_result_of_its_own_lease() -> None:
    unacked = UnackedResults()
    assert not unacked
    assert unacked.resend() is None
    unacked.hold(outcome("a"))
    unacked.hold(outcome("b"))
    stale = worker_service_pb2.ResultAck(
        task_id="a", lease_token="an-older-lease", status=worker_service_pb2.ACK_STATUS_ACCEPTED
    )
    assert unacked.acked([stale]) == []
    resend = unacked.resend()
    assert resend is not None
    assert result_ids([resend]) == [["a", "b"]]
    refused = worker_service_pb2.ResultAck(
        task_id="b", lease_token="lease-b", status=worker_service_pb2.ACK_STATUS_STALE_LEASE
    )
    accepted = worker_service_pb2.ResultAck(
        task_id="a", lease_token="lease-a", status=worker_service_pb2.ACK_STATUS_ACCEPTED
    )
    assert unacked.acked([accepted, refused]) == [refused]
    assert not unacked


async def run_quick_tasks(worker: Worker, count: int) -> None:
    """Run `count` quick tasks on `worker`'s thread pool, as assigned in one message."""

    @worker.task("t")
    def quick() -> int:
        return 1

    pool = worker._pool = make_pool("threads", worker.concurrency, dict(worker.tasks))
    await pool.start()
    try:
        worker._on_message(worker_service_pb2.ConnectResponse(assignments=worker_service_pb2.Assignments(
            items=[assignment(f"t{i}") for i in range(count)]
        )))
        await until(lambda: not worker._running, 10.0, f"the {count} tasks ended")
        await asyncio.sleep(0)
    finally:
        await pool.close()


async def test_a_one_slot_worker_sends_the_results_of_its_window_in_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrency 1, window 4: four quick tasks end in two Results messages of two, not four of
    one (the lingers are made long, so only the batch size and "nothing else running" send)."""
    monkeypatch.setattr(reports, "RESULT_LINGER_SECONDS", 30.0)
    monkeypatch.setattr(reports, "RESULT_BACKLOG_LINGER_SECONDS", 30.0)
    worker = Worker("127.0.0.1:1", concurrency=1, prefetch=4)
    sent: list[worker_service_pb2.ConnectRequest] = []
    worker._results = ResultBatcher(sent.append)
    await run_quick_tasks(worker, 4)
    assert result_ids(sent) == [["t0", "t1"], ["t2", "t3"]]


async def test_a_one_slot_worker_tells_its_batcher_of_a_backlog_while_tasks_wait_for_the_slot() -> None:
    worker = Worker("127.0.0.1:1", concurrency=1, prefetch=4)
    seen: list[tuple[str, bool, bool]] = []

    class Spy(ResultBatcher):
        def add(self, outcome: worker_service_pb2.TaskOutcome, *, others_running: bool, batch_size: int,
                backlog: bool = False) -> None:
            seen.append((outcome.task_id, others_running, backlog))
            super().add(outcome, others_running=others_running, batch_size=batch_size, backlog=backlog)

    worker._results = Spy(lambda _: None)
    await run_quick_tasks(worker, 3)
    assert seen == [("t0", True, True), ("t1", True, True), ("t2", False, False)]
