"""A blocking Redis connection pool whose common case costs no more than a list pop and append.

redis-py's asyncio `BlockingConnectionPool` takes every connection under an `asyncio.Condition`,
an `asyncio.timeout`, the pool's lock and its maintenance-lock context manager, records
connection metrics on the way in and out (each a coroutine, whether or not metrics are
enabled), and dispatches a "connection released" event for re-authentication. That made a GET
cost about half as much CPU again as on redis-py's non-blocking pool (`python
bench/redis_pool.py`), and the server makes a Redis call or more on every step of a task's path.

`QuickBlockingPool` keeps redis-py's pool and its semantics, and takes a fast path when nothing
can be waiting: an idle connection is popped, checked the way redis-py checks it
(`ensure_connection`: connected, nothing unread), and given back by an append. Whenever a
caller waits for a connection (all `max_connections` in use), during a maintenance window, for a
connection marked to reconnect, or with a credential provider (whose re-authentication listens
for released connections), both halves take redis-py's own path, so waiters are woken as before.
redis-py's own connection metrics are not kept on the fast path; Conveyor does not enable them.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection


class QuickBlockingPool(aioredis.BlockingConnectionPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Callers inside redis-py's get_connection, perhaps waiting on its condition for a
        # connection to be released: while there are any, releases must notify it.
        self._waiting = 0
        self._quick = self.connection_kwargs.get("credential_provider") is None

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        if self._quick and self._available_connections and not self._in_maintenance:
            connection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._waiting += 1
        try:
            return await super().get_connection()  # type: ignore[no-untyped-call,no-any-return]
        finally:
            self._waiting -= 1

    async def release(self, connection: AbstractConnection) -> None:
        if not self._quick or self._waiting or self._in_maintenance or connection.should_reconnect():  # type: ignore[no-untyped-call]
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
