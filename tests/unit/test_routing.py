"""Routing by task name on the memory engines (issue #15): a worker gets only tasks it
registered; the others go back to their queue for a worker that did, and a task no worker here
can run waits (counted as unroutable), it is never failed."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, worker_service_pb2
from conveyor_server.brokers.base import Delivery
from conveyor_server.core.publisher import decode_message
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from conveyor_server.core.routing import BOUNCE_FIRST_SECONDS, BOUNCE_MAX_SECONDS, Unroutable, bounce_delay
from conveyor_server.core.routing_timeout import past_routing_timeout, ready_at
from tests.support.loop_time import loop_now
from tests.unit.replicas import Replicas, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def test_the_bounce_delay_doubles_per_bounce_up_to_a_cap() -> None:
    assert [bounce_delay(n) for n in (0, 1, 2, 3)] == [BOUNCE_FIRST_SECONDS, BOUNCE_FIRST_SECONDS,
                                                        2 * BOUNCE_FIRST_SECONDS, 4 * BOUNCE_FIRST_SECONDS]
    assert bounce_delay(50) == bounce_delay(10_000) == BOUNCE_MAX_SECONDS


def test_unroutable_tasks_are_counted_until_routed_or_forgotten() -> None:
    now = [100.0]
    unroutable = Unroutable(clock=lambda: now[0])
    unroutable.turned_away("q", "t1")
    unroutable.turned_away("q", "t2")
    unroutable.turned_away("q", "t2")
    unroutable.turned_away("other", "t3")
    assert (unroutable.count("q"), unroutable.count("other"), unroutable.count("none")) == (2, 1, 0)
    unroutable.routed("q", "t1")
    assert unroutable.count("q") == 1
    now[0] += 60  # not turned away again for a long while: some replica's worker took it
    assert unroutable.count("q") == 0


def hello(worker_id: str, *names: str) -> worker_service_pb2.Hello:
    return worker_service_pb2.Hello(worker_id=worker_id, queues=[QUEUE], max_in_flight=10, task_names=list(names))


async def test_a_worker_is_assigned_only_the_tasks_it_registered(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(name="py.add", task_id="p1")), lone(task(name="node.mul", task_id="n1")))
    connections = replicas.a.connections
    python = connections.open(hello("py", "py.add"))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await connections.dispatcher.claim(deliveries, "py", time.monotonic(), python.can_run)
    assert [c.lease.task_id for c in claim.claimed] == ["p1"]
    assert [message.signature.name for _, message in claim.elsewhere] == ["node.mul"]
    record = await replicas.a.store.get("n1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_PENDING and record.deliveries == 0

    # No worker here registered node.mul: it waits in the queue, unroutable, and is not failed.
    await connections._pass_on(QUEUE, claim.elsewhere)
    assert replicas.a.registry.unroutable.count(QUEUE) == 1
    [info] = [q for q in await replicas.a.admin.queues() if q.name == QUEUE]
    assert info.unroutable == 1 and info.ready + info.delayed == 1

    # A Node worker connects: the task goes to it, and no longer counts as unroutable.
    node = connections.open(hello("node", "node.mul"))
    sent(node)
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0, wait_seconds=5.0)
    claim = await connections.dispatcher.claim(deliveries, "node", time.monotonic(), node.can_run)
    assert [c.lease.task_id for c in claim.claimed] == ["n1"] and claim.elsewhere == []
    await node.settle(0, claim.leases)
    await connections._send_claimed(node, claim)
    assert replicas.a.registry.unroutable.count(QUEUE) == 0


async def test_a_task_another_local_worker_can_run_is_not_unroutable(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1")))
    connections = replicas.a.connections
    python = connections.open(hello("py", "py.add"))
    connections.open(hello("node", "node.mul"))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await connections.dispatcher.claim(deliveries, "py", time.monotonic(), python.can_run)
    await connections._pass_on(QUEUE, claim.elsewhere)
    assert replicas.a.registry.unroutable.count(QUEUE) == 0
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.in_flight, stats.ready, stats.delayed) == (0, 1, 0), "handed back at once, for its worker"


@pytest.mark.parametrize("names", [(), ("py.add", "node.mul")])
async def test_a_worker_that_lists_no_names_or_the_right_ones_takes_the_task(replicas: Replicas,
                                                                            names: tuple[str, ...]) -> None:
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1")))
    session = replicas.a.connections.open(hello("w", *names))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w", time.monotonic(), session.can_run)
    assert [c.lease.task_id for c in claim.claimed] == ["n1"]


def timeout_of(seconds: int) -> Duration:
    return Duration(seconds=seconds)  # set even when 0: a field with presence


async def turn_away(replicas: Replicas, worker: worker_service_pb2.Hello) -> None:
    """A worker of replica a fetches the queue and passes on what it cannot run."""
    connections = replicas.a.connections
    session = connections.open(worker)
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await connections.dispatcher.claim(deliveries, worker.worker_id, time.monotonic(), session.can_run)
    await connections._pass_on(QUEUE, claim.elsewhere)


async def test_a_task_past_its_routing_timeout_fails_unroutable_with_its_error_callback(replicas: Replicas) -> None:
    on_error = task(name="py.report", task_id="report")
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1", routing_timeout=timeout_of(0),
                                       on_error=[on_error])))
    await turn_away(replicas, hello("py", "py.add", "py.report"))
    record = await replicas.a.store.get("n1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_FAILURE
    assert record.result.error.type == "Unroutable"
    assert "'node.mul'" in record.result.error.message and "routing_timeout of 0 s" in record.result.error.message
    assert "n1" in await replicas.backend.members(DEAD_LETTERS_GROUP), "replayable once a worker has it"
    assert replicas.a.registry.unroutable.count(QUEUE) == 0, "it no longer waits for a worker"
    # Its message is settled, not handed back; the error callback is what the queue holds now.
    messages = [decode_message(d.body) for d in await replicas.broker.fetch(QUEUE, 10, 30.0)]
    assert [m.signature.id for m in messages] == ["report"]


async def test_a_task_within_its_routing_timeout_waits(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1", routing_timeout=timeout_of(3600))))
    await turn_away(replicas, hello("py", "py.add"))
    record = await replicas.a.store.get("n1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_PENDING
    stats = await replicas.broker.stats(QUEUE)
    assert stats.ready + stats.delayed == 1, "handed back to wait for a worker"


async def test_a_task_a_worker_of_another_replica_registered_is_not_failed_by_its_routing_timeout(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1", routing_timeout=timeout_of(0))))
    replicas.b.connections.open(hello("node", "node.mul"))
    assert replicas.b.connections.tasks is not None and replicas.a.connections.tasks is not None
    await replicas.b.connections.tasks.written()
    await replicas.a.connections.tasks.load()
    await turn_away(replicas, hello("py", "py.add"))
    record = await replicas.a.store.get("n1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_PENDING
    stats = await replicas.broker.stats(QUEUE)
    assert stats.ready + stats.delayed == 1, "handed back for the other replica's worker"


def test_a_task_is_ready_from_its_latest_of_enqueueing_eta_and_retry() -> None:
    record = records_pb2.TaskRecord()
    record.result.submitted_at.FromSeconds(100)
    record.enqueued_at.FromSeconds(105)
    assert ready_at(record) == 105
    record.result.signature.eta.FromSeconds(200)
    assert ready_at(record) == 200
    record.retry_at.FromSeconds(300)
    assert ready_at(record) == 200, "a retry time counts only while the task waits for its retry"
    record.result.state = result_pb2.TASK_STATE_RETRY
    assert ready_at(record) == 300
    record.result.signature.routing_timeout.FromSeconds(10)
    assert not past_routing_timeout(record, 309.9)
    assert past_routing_timeout(record, 310.0)
    assert not past_routing_timeout(records_pb2.TaskRecord(), 1e12), "no routing_timeout: it waits for good"


@pytest.mark.looptime  # the pauses are asyncio sleeps: on the fake clock they take no real time
async def test_a_pump_that_fetches_only_tasks_for_other_workers_pauses_longer_each_time(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every fetch brings only tasks another worker registered, the pump waits
    bounce_delay(n) before its n+1-th fetch (it would otherwise spin on them); a fetch that
    brings a task of its own ends the pauses."""
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1")))
    connections = replicas.a.connections
    connections.open(hello("node", "node.mul"))  # its worker can run n1: handed back at once
    python = connections.open(hello("py", "py.add"))
    fetches: list[tuple[float, list[str]]] = []
    fetched = asyncio.Event()
    fetch = replicas.broker.fetch

    async def timed(*args: Any, **kwargs: Any) -> list[Delivery]:
        at = loop_now()
        deliveries = await fetch(*args, **kwargs)
        fetches.append((at, [decode_message(d.body).signature.id for d in deliveries]))
        fetched.set()
        return deliveries

    async def until_fetched(condition: Callable[[], object], what: str, seconds: float = 600.0) -> None:
        """Wait until `condition` holds, checked after each fetch, on the loop's clock (polling
        would take a loop turn every few fake milliseconds of the pauses)."""
        try:
            async with asyncio.timeout(seconds):
                while not condition():
                    fetched.clear()
                    await fetched.wait()
        except TimeoutError:
            raise AssertionError(f"{what} not met within {seconds} s of loop time") from None

    monkeypatch.setattr(replicas.broker, "fetch", timed)
    started = loop_now()
    pump = asyncio.create_task(connections._pump(python, QUEUE))
    try:
        await until_fetched(lambda: len(fetches) >= 6, "six fetches of the node task")
        assert fetches[0][0] - started == pytest.approx(0.0, abs=0.002), "the first fetch waits for nothing"
        gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(fetches[:6])]
        assert gaps == pytest.approx([bounce_delay(n) for n in range(1, 6)], abs=0.002)
        assert all(ids == ["n1"] for _, ids in fetches[:6])
        await submit(replicas.a, lone(task(name="py.add", task_id="p1")))
        await until_fetched(lambda: any("p1" in ids for _, ids in fetches), "a fetch of the python task")
        mine = next(i for i, (_, ids) in enumerate(fetches) if "p1" in ids)
        await until_fetched(lambda: len(fetches) >= mine + 3, "two fetches after it")
        after = [later[0] - earlier[0] for earlier, later in itertools.pairwise(fetches[mine : mine + 3])]
        assert after == pytest.approx([0.0, bounce_delay(1)], abs=0.002), "the pauses begin again from the first"
    finally:
        await python.close()
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
