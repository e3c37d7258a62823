"""Redis Cluster URLs and clients (redis.asyncio.cluster.RedisCluster).

A cluster URL names seed nodes; the client learns every node and slot from them:

- `redis+cluster://[user:password@]host:port[,host:port...]/?options` (the documented form), or
- `redis://host:port/?cluster=1&options` (one seed node; `cluster=yes`/`true` work too).

Options are redis-py's URL options (`socket_timeout`, `socket_connect_timeout`, ...). A cluster has
database 0 only, so a URL naming another database is refused. redis-py's cluster client keeps a
pool per node and fails a call past its size (MaxConnectionsError) instead of waiting for a free
connection, as the single-node pool (redis_pool.py) does; so the client here lets MAX_IN_FLIGHT
commands and pipelines run at once and makes the others wait, and each node's pool holds that
many connections plus a few for pub/sub.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlunsplit

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url

from .engine_urls import EngineUrl
from .redis_packing import packing_in_c

CLUSTER_SCHEME = "redis+cluster"
MAX_IN_FLIGHT = 256
# Connections of a node's pool beyond MAX_IN_FLIGHT: pub/sub readers borrow one each.
PUBSUB_HEADROOM = 8
# Set while a call holds its turn, so the commands redis-py issues inside it (a pipeline's
# retries of redirected commands) do not wait for a second one.
_holding: ContextVar[bool] = ContextVar("conveyor_redis_cluster_turn", default=False)


def is_cluster_url(url: str) -> bool:
    """Whether `url` asks for Redis Cluster (the `redis+cluster` scheme or `cluster=1`)."""
    options = EngineUrl(url)
    return options.parts.scheme == CLUSTER_SCHEME or options.flag("cluster", False)


def cluster_options(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(seed nodes, client options) of a cluster URL; ValueError for a malformed one."""
    parsed = EngineUrl(url)
    parts = parsed.parts
    credentials, _, hosts = parts.netloc.rpartition("@")
    query = parsed.query_without({"cluster"})
    nodes: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for seed in hosts.split(","):
        # redis-py's own URL parser reads each seed, the credentials and the options.
        netloc = f"{credentials}@{seed}" if credentials else seed
        options = dict(parse_url(urlunsplit(("redis", netloc, parts.path, query, ""))))
        if not options.get("host"):
            raise ValueError(f"Redis Cluster URL {url!r}: every seed needs a host (host:port,host:port)")
        nodes.append((str(options.pop("host")), int(options.pop("port", 6379))))
    if int(options.pop("db", 0) or 0) != 0:
        raise ValueError(f"Redis Cluster URL {url!r}: a cluster has database 0 only")
    return nodes, options


class _Turns:
    """At most MAX_IN_FLIGHT calls at once; the others wait for a turn."""

    def __init__(self) -> None:
        self._free = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def run(self, call: Any) -> Any:
        if _holding.get():
            return await call()
        async with self._free:
            token = _holding.set(True)
            try:
                return await call()
            finally:
                _holding.reset(token)


class WaitingRedisCluster(RedisCluster):
    """RedisCluster whose calls wait for a free connection instead of failing past the pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = _Turns()
        # Commands packed in C (redis_packing.py): the nodes known now, and those found later
        # (the nodes manager makes them from these same connection options).
        packing = packing_in_c(self.connection_kwargs["connection_class"])
        self.connection_kwargs["connection_class"] = packing
        for node in self.startup_nodes:
            node.connection_class = packing

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self._turns.run(lambda: super(WaitingRedisCluster, self).execute_command(*args, **kwargs))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises: no shard hints on a cluster
        # mypy reads ClusterPipeline as abstract (redis-py's typing); RedisCluster.pipeline makes one too.
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, WaitingRedisCluster)
        result: list[Any] = await client._turns.run(
            lambda: ClusterPipeline.execute(self, raise_on_error, allow_redirections)
        )
        return result


def open_redis_cluster(url: str, **defaults: Any) -> RedisCluster:
    """A cluster client for `url`; the URL's options win over `defaults`. Connects lazily."""
    nodes, options = cluster_options(url)
    return WaitingRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        max_connections=MAX_IN_FLIGHT + PUBSUB_HEADROOM,
        **{**defaults, **options},
    )
