"""The Redis broker and backend on Redis Cluster, beyond the conformance suites (which run them as
`redis_cluster`): cluster URLs, and a master killed with SIGKILL (no replica), then restarted on
its data dir, under each."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from conveyor_server.backends.base import Update, Versioned
from conveyor_server.backends.redis import RedisBackend
from conveyor_server.brokers.base import Delivery, OutgoingMessage, QueueStats
from conveyor_server.brokers.redis import RedisBroker
from conveyor_server.engine_errors import is_transient
from conveyor_server.engines import open_broker
from conveyor_server.redis_cluster import cluster_options, is_cluster_url, open_redis_cluster
from conveyor_server.redis_pool import open_redis
from tests.conformance.test_backend import Watching
from tests.fixtures.redis_cluster import RedisCluster, start_redis_cluster

LEASE = 30.0
# How long a call may take to fail while a master is down (redis-py retries a few times first).
FAIL_WITHIN_SECONDS = 60.0
# A waiting fetch's poll in the kill test: long, so a fetch that returns sooner was woken by a signal.
POLL = 40.0


def test_cluster_urls() -> None:
    nodes, options = cluster_options("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001/?socket_timeout=2")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (options["username"], options["password"], options["socket_timeout"]) == ("u", "pw", 2.0)
    assert is_cluster_url("redis://10.0.0.1:7000/?cluster=1")
    assert cluster_options("redis://10.0.0.1:7000/?cluster=1")[0] == [("10.0.0.1", 7000)]
    assert not is_cluster_url("redis://10.0.0.1:7000/0?cluster=0")
    with pytest.raises(ValueError, match="database 0 only"):
        cluster_options("redis+cluster://10.0.0.1:7000/3")
    # The single-node opener says so instead of misreading the URL.
    with pytest.raises(ValueError, match="Redis Cluster URL"):
        open_redis("redis://10.0.0.1:7000/?cluster=1")


async def test_cluster_equals_one_is_accepted(redis_cluster: RedisCluster) -> None:
    seed = redis_cluster.url.removeprefix("redis+cluster://").split(",")[0]
    broker = open_broker(f"redis://{seed}/?cluster=1&prefix=c1{uuid.uuid4().hex[:8]}")
    await broker.connect()
    try:
        queue = f"q-{uuid.uuid4().hex}"
        await broker.publish(queue, [OutgoingMessage("m", b"body")])
        [delivery] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        await broker.ack([delivery])
    finally:
        await broker.close()


async def test_a_new_process_finds_leases_on_every_master_without_the_registry(redis_cluster: RedisCluster) -> None:
    prefix = f"scan{uuid.uuid4().hex[:8]}"
    url = f"{redis_cluster.url}?prefix={prefix}"
    queues = [f"q{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]  # spread over the three masters
    crashed = RedisBroker.from_url(url)
    await crashed.connect()
    try:
        for queue in queues:
            await crashed.publish(queue, [OutgoingMessage("m", b"body")])
            assert len(await crashed.fetch(queue, 10, 0.3, wait_seconds=2)) == 1
    finally:
        await crashed.close()
    client = open_redis_cluster(redis_cluster.url)
    try:
        assert await client.delete(f"{prefix}:queues") == 1
    finally:
        await client.aclose()
    await asyncio.sleep(0.5)

    restarted = RedisBroker.from_url(url)
    await restarted.connect()
    try:
        assert await restarted.recover_expired() == len(queues)  # found by their lease keys (SCAN per master)
        assert sorted(queues) == await restarted.queues()
    finally:
        await restarted.close()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = start_redis_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


async def _name_on(client: ClusterClient, port: int, *key_formats: str) -> str:
    """A name whose keys (each format with the name in its `{name}`) all live on the master on `port`."""
    for _ in range(100_000):
        name = f"n{uuid.uuid4().hex[:8]}"
        nodes = [client.get_node_from_key(form.format(name=name)) for form in key_formats]
        if all(node is not None and node.port == port for node in nodes):
            return name
    raise AssertionError(f"no name puts {key_formats} on the master on {port}")


async def _fails_as_transient(call: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(Exception) as raised:  # which error is the engine's business
        await asyncio.wait_for(call(), FAIL_WITHIN_SECONDS)
    assert is_transient(raised.value), repr(raised.value)


async def _eventually(call: Callable[[], Awaitable[Any]], seconds: float = 60.0) -> Any:
    """The first result of `call` that does not raise a transient error."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _signal_arrives(waiting: RedisBroker, queue: str, sender: RedisBroker) -> None:
    """A fetch waiting on `queue` wakes on a publish, long before its poll would (POLL)."""
    fetch = asyncio.create_task(waiting.fetch(queue, 10, LEASE, wait_seconds=POLL))
    try:
        # The listener may still be resubscribing after an outage: publish until one signal lands.
        for attempt in range(30):
            await sender.publish(queue, [OutgoingMessage(f"signal{attempt}", b"s")])
            done, _ = await asyncio.wait({fetch}, timeout=0.5)
            if done:
                break
        assert fetch.done(), "no signal reached the waiting fetch"
        await waiting.ack(fetch.result())
    finally:
        fetch.cancel()


async def test_a_killed_master_restarted_loses_nothing_acknowledged(own_cluster: RedisCluster) -> None:
    prefix = f"kill{uuid.uuid4().hex[:8]}"
    probe = open_redis_cluster(own_cluster.url)
    await probe.initialize()
    try:
        # A master the broker reads signals on (it reads them on every master), so its restart
        # tests the signals too.
        node = probe.get_node_from_key(f"{prefix}:signal:*")
        assert node is not None
        victim = own_cluster.ports.index(int(node.port))
        queue = await _name_on(probe, int(node.port), prefix + ":{{{name}}}:msg")
    finally:
        await probe.aclose()
    broker = RedisBroker.from_url(f"{own_cluster.url}?prefix={prefix}&poll={POLL}")
    sender = RedisBroker.from_url(f"{own_cluster.url}?prefix={prefix}")
    await broker.connect()
    await sender.connect()
    # The signals are read on every master, the victim's included.
    assert node.port in {pubsub.get_pubsub_node().port for pubsub in broker._pubsubs}
    try:
        await broker.publish(queue, [OutgoingMessage(f"m{i}", f"body{i}".encode()) for i in range(20)])
        acked = await broker.fetch(queue, 5, LEASE, wait_seconds=2)
        await broker.ack(acked)
        held: list[Delivery] = await broker.fetch(queue, 5, LEASE, wait_seconds=2)
        assert len(acked) == len(held) == 5

        own_cluster.kill(victim)
        await _fails_as_transient(lambda: broker.publish(queue, [OutgoingMessage("lost?", b"x")]))
        await _fails_as_transient(lambda: broker.fetch(queue, 10, LEASE))

        own_cluster.restart(victim)
        # The same broker, not reconnected: its client finds the master again, and the master its AOF.
        stats = await _eventually(lambda: broker.stats(queue))
        pending = stats.ready + stats.in_flight
        # The publish during the outage may or may not have been applied; everything acknowledged was.
        assert stats.in_flight == 5 and pending in (15, 16), stats
        await broker.ack(held)  # the receipts of leases taken before the crash still hold
        rest = await broker.fetch(queue, 100, LEASE, wait_seconds=2)
        expected = {f"m{i}" for i in range(20)} - {d.message_id for d in acked + held}
        assert {d.message_id for d in rest} - {"lost?"} == expected
        await broker.ack(rest)
        assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
        # Scripts were reloaded on the restarted master (its script cache started empty).
        await broker.publish(queue, [OutgoingMessage("after", b"y")])
        [after] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        assert after.message_id == "after"
        await broker.ack([after])
        await _signal_arrives(broker, queue, sender)
    finally:
        await sender.close()
        await broker.close()


async def test_a_killed_master_restarted_keeps_every_acknowledged_write(own_cluster: RedisCluster) -> None:
    prefix = f"killb{uuid.uuid4().hex[:8]}"
    probe = open_redis_cluster(own_cluster.url)
    await probe.initialize()
    try:
        victim = 1
        port = own_cluster.ports[victim]
        # A record whose key and watch channel both live on the victim (so the watch's pub/sub
        # connection is the one that dies), and a group and a claim there too.
        key = await _name_on(probe, port, prefix + ":r:{name}", prefix + ":w:{name}")
        group = await _name_on(probe, port, prefix + ":g:{{g:{name}}}")
        claim = await _name_on(probe, port, prefix + ":c:{name}")
    finally:
        await probe.aclose()
    backend = RedisBackend.from_url(f"{own_cluster.url}?prefix={prefix}")
    await backend.connect()
    watching = Watching(backend, [key])
    try:
        await watching.started()
        await backend.insert({key: b"v1"})
        assert await backend.compare_and_set([Update(key, 1, b"v2")]) == [True]
        await watching.reports(key)
        assert await backend.add_members(group, {"a": b"1", "b": b"2"}) == 2
        assert await backend.claim(claim) is True

        own_cluster.kill(victim)
        await _fails_as_transient(lambda: backend.get([key]))
        await _fails_as_transient(lambda: backend.compare_and_set([Update(key, 2, b"lost?")]))

        own_cluster.restart(victim)
        # The same backend, not reconnected.
        found = await _eventually(lambda: backend.get([key]))
        assert found[key] in (Versioned(b"v2", 2), Versioned(b"lost?", 3))  # the failed CAS may have applied
        version = found[key].version
        assert await backend.members(group) == {"a": b"1", "b": b"2"}
        assert await backend.claim(claim) is False
        # Scripts load again on the restarted master: one record, then a batch over every slot.
        assert await backend.compare_and_set([Update(key, version, b"v3")]) == [True]
        await watching.reports(key)  # the watch resubscribed on the restarted master
        batch = {f"{prefix}-batch{i}": b"x" for i in range(50)}
        assert await backend.insert(batch) == []
        assert len(await backend.get(list(batch))) == 50
    finally:
        await watching.stop()
        await backend.close()


async def test_watch_channels_and_signals_are_read_on_the_master_that_publishes_them(
    redis_cluster: RedisCluster,
) -> None:
    # A PUBLISH reaches another master's subscribers only over the cluster bus, which held about
    # 1 in 100 for 40 ms: each record's channel must be read on the master that owns the record
    # (its writes PUBLISH there), and the queues' signals on every master.
    prefix = f"route{uuid.uuid4().hex[:8]}"
    backend = RedisBackend.from_url(f"{redis_cluster.url}?prefix={prefix}")
    broker = RedisBroker.from_url(f"{redis_cluster.url}?prefix={prefix}")
    probe = open_redis_cluster(redis_cluster.url)
    await backend.connect()
    await broker.connect()
    await probe.initialize()
    keys = [f"task:{uuid.uuid4().hex}" for _ in range(30)]
    watching = Watching(backend, keys)
    try:
        await watching.started()
        masters = probe.get_primaries()
        for master in masters:
            node = aioredis.Redis(host=master.host, port=int(master.port), decode_responses=True)
            try:
                read_here = set(await node.pubsub_channels(f"{prefix}:w:*"))
            finally:
                await node.aclose()
            owned_here = {
                f"{prefix}:w:{key}" for key in keys
                if _owner(probe, f"{prefix}:r:{key}") == master.name
            }
            assert owned_here, "30 random records leave no master without one"
            assert read_here == owned_here
        assert sorted(pubsub.get_pubsub_node().name for pubsub in broker._pubsubs) == sorted(m.name for m in masters)
        for key in keys[:3]:  # and the watch still hears of writes
            await backend.insert({key: b"v1"})
            await watching.reports(key)
    finally:
        await watching.stop()
        await probe.aclose()
        await broker.close()
        await backend.close()


def _owner(client: ClusterClient, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)
