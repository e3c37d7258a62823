"""The Redis client both Redis engines use: a blocking connection pool, so a burst of
concurrent operations waits for a free connection instead of failing (redis-py's default
pool raises "Too many connections" past 100), with a fast path for the common case
(redis_quick_pool.py)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from .redis_cluster import is_cluster_url
from .redis_packing import packing_in_c
from .redis_quick_pool import QuickBlockingPool

MAX_CONNECTIONS = 256
# How long an operation may wait for a free connection before it fails.
WAIT_SECONDS = 30.0


def open_redis(url: str, **options: Any) -> aioredis.Redis:
    if is_cluster_url(url):  # redis-py would take `cluster=1` for a connection option
        raise ValueError(f"{url!r} is a Redis Cluster URL: open it with redis_cluster.open_redis_cluster")
    pool = QuickBlockingPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=WAIT_SECONDS, **options
    )
    pool.connection_class = packing_in_c(pool.connection_class)  # from_url chose it: TCP, TLS or a socket
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
