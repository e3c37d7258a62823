"""The Redis broker and backend run their Lua scripts by EVALSHA in pipelines
(server/conveyor_server/redis_scripts.py); when Redis loses its script cache (a restart, SCRIPT
FLUSH) each call that met NOSCRIPT runs again once its script is loaded, and nothing runs twice.
On a private redis-server: flushing the shared one's scripts would touch other runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conveyor_server.backends.base import GroupMember
from conveyor_server.backends.redis import RedisBackend
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.redis import RedisBroker
from tests.support.redis_server import RedisServer


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def flush_scripts(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url())
    try:
        client.script_flush()
        assert client.script_exists("0" * 40) == [False]
    finally:
        client.close()


async def test_the_broker_runs_every_script_once_after_redis_lost_them(private_redis: RedisServer) -> None:
    broker = RedisBroker.from_url(private_redis.url(prefix="scripts"))
    await broker.connect()
    try:
        await broker.publish("a", [OutgoingMessage("m1", b"one")])
        flush_scripts(private_redis)
        # A publish (with the queue's registration ahead of it in the pipeline) and a fetch.
        await broker.publish("b", [OutgoingMessage("m2", b"two")])
        got = await broker.fetch("a", 10, 30.0) + await broker.fetch("b", 10, 30.0)
        assert sorted(d.message_id for d in got) == ["m1", "m2"], "each message once"
        flush_scripts(private_redis)
        await broker.ack(got)  # one pipeline of two scripts (a queue each), both lost
        assert (await broker.stats("a")).in_flight == (await broker.stats("b")).in_flight == 0
        assert await broker.fetch("a", 10, 30.0, 0.1) == [] and await broker.fetch("b", 10, 30.0, 0.1) == []
    finally:
        await broker.close()


async def test_the_backend_runs_its_scripts_after_redis_lost_them(private_redis: RedisServer) -> None:
    backend = RedisBackend.from_url(private_redis.url(prefix="scripts"))
    await backend.connect()
    try:
        assert await backend.insert({"k1": b"v1"}) == []
        flush_scripts(private_redis)
        assert await backend.insert({"k1": b"again", "k2": b"v2"}) == ["k1"], "an insert never overwrites"
        flush_scripts(private_redis)
        assert await backend.add_members("g", {"x": b"1", "y": b"2"}) == 2
        assert await backend.members("g") == {"x": b"1", "y": b"2"}
        flush_scripts(private_redis)
        assert await backend.insert_after(GroupMember("g", "z", b"3"), {"k2": b"x", "k3": b"v3"}) == ["k2"]
        assert await backend.members("g") == {"x": b"1", "y": b"2", "z": b"3"}
    finally:
        await backend.close()
