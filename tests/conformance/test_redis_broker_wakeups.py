"""A waiting fetch on the Redis broker wakes at once after a publish or nack made by the same
broker, without the pub/sub signal: in a cluster that signal may cross the cluster bus, which
held about 1 in 100 of them for 40 ms (bench/cluster.py: p99 48.6 ms before, 5.6 ms after).
Fetches woken together make one look; a publish takes the look of a fetch waiting on the same
broker in its own round trip and hands it the messages (given back when that fetch has left)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.redis import RedisBroker

LEASE = 30.0
# Longer than the test waits for a wake: a fetch that returns in time was woken, not polling.
POLL_SECONDS = 60
WAIT_SECONDS = 10.0
WOKEN_WITHIN_SECONDS = 2.0
IDLE_WORKERS = 6


@pytest.fixture(params=["redis_broker_url", "redis_cluster_broker_url"], ids=["redis", "redis_cluster"])
async def deaf_broker(request: pytest.FixtureRequest) -> AsyncIterator[RedisBroker]:
    """A broker that hears no pub/sub signal (its listener stopped) and polls only every minute."""
    url: str = request.getfixturevalue(request.param)
    engine = RedisBroker.from_url(f"{url}{'&' if '?' in url else '?'}poll={POLL_SECONDS}")
    await engine.connect()
    assert engine._listeners
    for listener in engine._listeners:
        listener.cancel()
    await asyncio.gather(*engine._listeners, return_exceptions=True)
    yield engine
    await engine.close()


async def woken_fetch(broker: RedisBroker, queue: str) -> tuple[list[str], float]:
    started = time.monotonic()
    deliveries = await broker.fetch(queue, 10, LEASE, wait_seconds=WAIT_SECONDS)
    return [d.message_id for d in deliveries], time.monotonic() - started


async def test_a_waiting_fetch_wakes_on_its_own_brokers_publish(deaf_broker: RedisBroker) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)  # the fetch found nothing and waits

    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS


async def test_a_waiting_fetch_wakes_on_its_own_brokers_nack(deaf_broker: RedisBroker) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])
    [delivery] = await deaf_broker.fetch(queue, 10, LEASE)
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)

    await deaf_broker.nack([delivery])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS


@pytest.fixture(params=["redis_broker_url", "redis_cluster_broker_url"], ids=["redis", "redis_cluster"])
async def two_brokers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    """Two brokers on the same engine, as two server replicas, each hearing the signals."""
    url: str = request.getfixturevalue(request.param)
    brokers = [RedisBroker.from_url(f"{url}{'&' if '?' in url else '?'}poll={POLL_SECONDS}") for _ in range(2)]
    for broker in brokers:
        await broker.connect()
    yield brokers[0], brokers[1]
    for broker in brokers:
        await broker.close()


async def test_the_echo_of_a_brokers_own_signal_does_not_make_it_look_again_at_a_drained_queue(
    two_brokers: tuple[RedisBroker, RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At light load every task is fetched alone; a look after it finds the queue empty. The
    broker's own publish woke its fetch already, so the pub/sub echo of that signal must not
    count as news, while another replica's signal must."""
    here, other = two_brokers
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(here, queue))
    await asyncio.sleep(0.2)
    await here.publish(queue, [OutgoingMessage("m1", b"body")])
    assert (await fetch)[0] == ["m1"]  # one of the ten it asked for: the queue is drained
    await asyncio.sleep(0.2)  # the echo of the publish's signal has come back by now

    looks = count_looks(here, monkeypatch)
    fetch = asyncio.create_task(woken_fetch(here, queue))
    await asyncio.sleep(0.3)
    assert looks() == 0, "the fetch looked at a queue nothing had been published to since it drained it"

    await other.publish(queue, [OutgoingMessage("m2", b"body")])
    ids, seconds = await fetch
    assert ids == ["m2"]
    assert seconds < WOKEN_WITHIN_SECONDS
    assert looks() == 1


def count_round_trips(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The script names of each round trip the broker makes from now on."""
    trips: list[list[str]] = []
    eval_many = broker._eval_many

    async def recording(
        calls: list[tuple[str, list[str], list[object]]], register: tuple[str, ...] = ()
    ) -> list[object]:
        trips.append([name for name, _, _ in calls])
        return await eval_many(calls, register)

    monkeypatch.setattr(broker, "_eval_many", recording)
    return trips


def count_looks(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times the broker has looked at a queue (run its fetch script) from now on."""
    trips = count_round_trips(broker, monkeypatch)
    return lambda: sum(names.count("fetch") for names in trips)


@pytest.mark.parametrize("publisher", ["this replica", "another replica"])
async def test_fetches_woken_by_a_lone_message_make_one_look_between_them(
    two_brokers: tuple[RedisBroker, RedisBroker], monkeypatch: pytest.MonkeyPatch, publisher: str
) -> None:
    """A server holds one waiting fetch per worker connection on a queue; one message must not
    cost a look per idle worker (bench/latency.py --processes 6: 71 Redis commands per task)."""
    here, other = two_brokers
    queue = f"wake-{uuid.uuid4().hex}"
    await here.publish(queue, [OutgoingMessage("m0", b"body")])
    assert len(await here.fetch(queue, 10, LEASE)) == 1  # drained
    looks = count_looks(here, monkeypatch)
    fetches = [asyncio.create_task(woken_fetch(here, queue)) for _ in range(IDLE_WORKERS)]
    await asyncio.sleep(0.3)
    assert looks() == 0

    await (here if publisher == "this replica" else other).publish(queue, [OutgoingMessage("m1", b"body")])
    await asyncio.wait(fetches, timeout=WOKEN_WITHIN_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.2)  # the signal's echo, and any look it would start, have come and gone
    assert [task.result()[0] for task in fetches if task.done()] == [["m1"]]
    assert looks() == 1, f"{looks()} looks for one message among {IDLE_WORKERS} waiting fetches"
    waiting = [task for task in fetches if not task.done()]
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_fetch_waiting_on_a_drained_queue_wakes_when_this_broker_recovers_an_expired_lease(
    deaf_broker: RedisBroker,
) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])
    assert len(await deaf_broker.fetch(queue, 10, 0.1)) == 1  # drained, and leased for 0.1 s
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.3)  # the lease has expired

    # At least this one: the session's prefix is shared, so other tests' expired leases may come too.
    assert await deaf_broker.recover_expired() >= 1

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS


async def test_a_publish_fetches_for_a_fetch_waiting_here_in_its_own_round_trip(
    deaf_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone task's publish and the look that takes it were two round trips one after another."""
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)  # the fetch found nothing and waits
    trips = count_round_trips(deaf_broker, monkeypatch)

    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS
    await asyncio.sleep(0.1)
    assert trips == [["publish", "fetch"]]


async def publish_while_the_fetch_leaves(
    broker: RedisBroker, queue: str, fetch: asyncio.Task[Any], monkeypatch: pytest.MonkeyPatch,
    hand_back_fails: bool = False,
) -> None:
    """Publish one message while `fetch` waits, cancelling `fetch` (its worker went away) when
    the publish's round trip, with the look made for it, is on the way back; with
    `hand_back_fails`, the nack that gives the message back fails."""
    eval_many = broker._eval_many

    async def leaving_meanwhile(
        calls: list[tuple[str, list[str], list[object]]], register: tuple[str, ...] = ()
    ) -> list[object]:
        if hand_back_fails and any(name == "nack" for name, _, _ in calls):
            raise ConnectionError("Redis went away")
        replies = await eval_many(calls, register)
        fetch.cancel()
        await asyncio.sleep(0)
        return replies

    monkeypatch.setattr(broker, "_eval_many", leaving_meanwhile)
    await broker.publish(queue, [OutgoingMessage("m1", b"body")])
    monkeypatch.undo()


async def test_what_a_publish_fetched_for_a_fetch_that_left_meanwhile_goes_back_to_the_queue(
    deaf_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting fetch is cancelled (its worker went away) while the publish's round trip, with
    the look made for it, is on the way back: the message it leased must not wait out a lease."""
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)
    await publish_while_the_fetch_leaves(deaf_broker, queue, fetch, monkeypatch)

    with pytest.raises(asyncio.CancelledError):
        await fetch
    [delivery] = await deaf_broker.fetch(queue, 10, LEASE)  # at once, not after the lease
    assert delivery.message_id == "m1"


async def test_a_delayed_publish_with_a_fetch_waiting_here_is_fetched_when_due(deaf_broker: RedisBroker) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)

    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body", delay=0.3)])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert 0.3 <= seconds < WOKEN_WITHIN_SECONDS  # its due time, not the minute's poll


async def test_a_fetch_not_handed_a_message_still_learns_when_a_delayed_one_of_the_publish_is_due(
    deaf_broker: RedisBroker,
) -> None:
    """The first waiting fetch takes the ready message in the publish's round trip; the other
    must still be woken to look, or it would sleep through the delayed message's due time."""
    queue = f"wake-{uuid.uuid4().hex}"
    first = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)

    await deaf_broker.publish(queue, [OutgoingMessage("now", b"body"), OutgoingMessage("later", b"body", delay=0.3)])

    assert (await first)[0] == ["now"]
    ids, seconds = await second
    assert ids == ["later"]
    assert seconds < WOKEN_WITHIN_SECONDS


async def test_a_publish_whose_hand_back_fails_still_succeeds_and_the_lease_brings_the_message_back(
    deaf_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published is published: a failed hand-back of what was fetched for a fetch that left must
    not make the publish look failed (its caller would publish the task again)."""
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(deaf_broker.fetch(queue, 10, 0.2, wait_seconds=WAIT_SECONDS))
    await asyncio.sleep(0.2)
    await publish_while_the_fetch_leaves(deaf_broker, queue, fetch, monkeypatch, hand_back_fails=True)

    await asyncio.sleep(0.3)  # the 0.2 s lease taken for the fetch that left has run out
    assert await deaf_broker.recover_expired() >= 1
    [delivery] = await deaf_broker.fetch(queue, 10, LEASE)
    assert delivery.message_id == "m1"
