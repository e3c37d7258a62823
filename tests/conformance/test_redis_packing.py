"""The Redis clients the engines open (redis_pool.open_redis, redis_cluster.open_redis_cluster)
pack commands with hiredis (conveyor_server/redis_packing.py), on one Redis and on every node of
a cluster, and Redis reads back exactly what was sent. (The broker and backend conformance suites
run every engine operation over these same clients.)"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from conveyor_server.redis_cluster import open_redis_cluster
from conveyor_server.redis_packing import packing_in_c
from conveyor_server.redis_pool import open_redis
from tests.fixtures.broker_services import ensure_redis
from tests.fixtures.redis_cluster import RedisCluster

pytestmark = pytest.mark.skipif(packing_in_c(Connection) is Connection, reason="hiredis is not installed")

VALUES: dict[str, str | bytes] = {"text": "välue ✓", "binary": b"\x00\xff\r\n$3\r\n", "big": b"x" * 100_000}
ECHO = "return {ARGV[1], ARGV[2], ARGV[3]}"


async def round_trip(client: aioredis.Redis | aioredis.RedisCluster, prefix: str) -> None:
    keys = {name: f"{prefix}:{{{prefix}}}:{name}" for name in VALUES}
    try:
        for name, value in VALUES.items():
            await client.set(keys[name], value)
        assert [await client.get(keys[name]) for name in VALUES] == [
            v.encode() if isinstance(v, str) else v for v in VALUES.values()
        ]
        assert await client.eval(ECHO, 1, keys["text"], 1.5, -3, "é") == [b"1.5", b"-3", "é".encode()]
        async with client.pipeline(transaction=False) as pipe:
            for key in keys.values():
                pipe.strlen(key)
            assert await pipe.execute() == [len(v.encode() if isinstance(v, str) else v) for v in VALUES.values()]
    finally:
        await client.delete(*keys.values())


async def test_one_redis_packs_in_c_and_reads_back_what_it_sent() -> None:
    client = open_redis(ensure_redis())
    try:
        await round_trip(client, f"packing-{uuid.uuid4().hex}")
        assert client.connection_pool.connection_class is packing_in_c(Connection)
    finally:
        await client.aclose()


async def test_every_cluster_node_packs_in_c(redis_cluster: RedisCluster) -> None:
    client = open_redis_cluster(redis_cluster.url)
    try:
        for n in range(6):  # keys on more than one master
            await round_trip(client, f"packing-{n}-{uuid.uuid4().hex}")
        nodes = client.get_nodes()
        assert len(nodes) >= 3
        assert all(node.connection_class is packing_in_c(Connection) for node in nodes)
    finally:
        await client.aclose()
