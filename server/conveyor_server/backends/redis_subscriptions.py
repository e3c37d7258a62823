"""The Redis backend's change feed: a pub/sub channel per watched record key.

Every watch() of a backend shares the subscriptions: one connection on a single Redis. On Redis
Cluster a PUBLISH reaches the subscribers of other nodes only through the cluster bus, which held
about 1 in 100 messages for 40 ms (docs/scaling.md), so there a record's channel is subscribed
on the node that owns the record, where its scripts PUBLISH: one connection, and one reader,
per node in use. A record whose slot moved since keeps its subscription on the old node, which
still hears of its writes, through the bus.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster

from ..background import stop_tasks
from ..backoff import Backoff
from ._watch import Registry, Watcher

log = logging.getLogger(__name__)

# The reader wakes this often so redis-py can PING: a silently dead connection would otherwise
# block it forever and every watch would miss changes.
READ_SECONDS = 1.0
# The connection of a single Redis (no node routing).
_ONLY = ""


class Subscriptions:
    """The feed of a backend's watches: SUBSCRIBEs each key's channel (prefix + key) once, for
    every watcher of the key, and tells the registry of each message."""

    def __init__(
        self, client: aioredis.Redis | RedisCluster, channel_prefix: str,
        node_of: Callable[[str], ClusterNode | None] | None = None,
    ) -> None:
        self._client = client
        # The cluster node whose connection reads a key's channel (None: any one).
        self._node_of = node_of
        self._prefix = channel_prefix.encode()
        self._registry = Registry()
        self._pubsubs: dict[str, PubSub] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        # Which connection each channel was subscribed on, to unsubscribe it there.
        self._subscribed_on: dict[bytes, str] = {}
        # Futures resolved by the server's subscribe confirmation, in send order.
        self._pending: dict[bytes, list[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()

    def _channel(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _connection_for(self, key: str) -> str:
        """The name of the connection that reads `key`'s channel, opened on first use."""
        node = self._node_of(key) if self._node_of is not None else None
        name = node.name if node is not None else _ONLY
        if name not in self._pubsubs:
            if node is not None and isinstance(self._client, RedisCluster):
                self._pubsubs[name] = self._client.pubsub(node=node)
            else:
                self._pubsubs[name] = self._client.pubsub()
        return name

    async def add(self, watcher: Watcher) -> None:
        """Return once Redis confirms every channel, so no later PUBLISH can be missed."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        async with self._lock:  # keeps SUBSCRIBE/UNSUBSCRIBE in the order we decided them
            asked: dict[bytes, asyncio.Future[None]] = {}
            by_connection: dict[str, list[bytes]] = defaultdict(list)
            for key in self._registry.add(watcher):
                channel = self._channel(key)
                asked[channel] = loop.create_future()
                self._pending.setdefault(channel, []).append(asked[channel])
                by_connection[self._connection_for(key)].append(channel)
            for key in watcher.keys:
                waits.extend(self._pending.get(self._channel(key), ()))
            try:
                for name, channels in by_connection.items():
                    await self._pubsubs[name].subscribe(*channels)
                    self._subscribed_on.update(dict.fromkeys(channels, name))
                    if name not in self._readers:
                        self._readers[name] = asyncio.create_task(self._read(name), name="conveyor-redis-watch")
            except BaseException:
                self._forget(watcher, asked)
                raise
        if waits:
            # wait(), unlike gather(), leaves the futures (shared with other watchers) alone
            # when this call is cancelled, with no shield per channel of a 10,000-task watch.
            await asyncio.wait(waits)

    def _forget(self, watcher: Watcher, asked: dict[bytes, asyncio.Future[None]]) -> None:
        """Undo add() after a failed SUBSCRIBE (a channel subscribed on another node meanwhile
        stays subscribed; its messages name no watcher, and a later add() asks again)."""
        for channel, wait in asked.items():
            waits = self._pending.get(channel, [])
            if wait in waits:
                waits.remove(wait)
            if not waits:
                self._pending.pop(channel, None)
        self._registry.remove(watcher)

    async def remove(self, watcher: Watcher) -> None:
        async with self._lock:
            gone = [self._channel(key) for key in self._registry.remove(watcher)]
            for name, channels in _grouped(gone, self._subscribed_on).items():
                pubsub = self._pubsubs[name]
                if pubsub.connection is None:
                    continue  # a dead connection has no subscriptions left to drop
                try:
                    await pubsub.unsubscribe(*channels)
                except Exception:
                    log.warning("redis unsubscribe failed", exc_info=True)

    async def close(self) -> None:
        await stop_tasks(*self._readers.values())
        self._registry.close_all()
        for waits in self._pending.values():
            for wait in waits:
                if not wait.done():
                    wait.set_result(None)  # lets a starting watch() see it is closed
        for pubsub in self._pubsubs.values():
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, name: str) -> None:
        pubsub = self._pubsubs[name]
        backoff = Backoff()
        while True:
            try:
                message = await pubsub.get_message(timeout=READ_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # redis-py reconnects and resubscribes on the next read; the resubscribe
                # confirmations below then mark every key as changed.
                delay = backoff.next()
                log.warning("redis watch connection lost (%s); reconnecting in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            waits = self._pending.get(channel)
            if waits:
                waits.pop(0).set_result(None)
                if not waits:
                    del self._pending[channel]
                return
            # Unasked-for confirmation: a resubscribe after reconnecting; changes during
            # the outage were not delivered, so report the key as possibly changed.
            self._registry.dispatch(channel[len(self._prefix) :].decode())
        elif kind == "message":
            self._registry.dispatch(channel[len(self._prefix) :].decode(), _version(message["data"]))


def _version(payload: bytes | str) -> int | None:
    """The version a write PUBLISHed (redis.py), or None where it did not say."""
    try:
        return int(payload) if payload else None
    except ValueError:
        return None


def _grouped(channels: Iterable[bytes], subscribed_on: dict[bytes, str]) -> dict[str, list[bytes]]:
    """`channels` by the connection they were subscribed on (each forgotten here)."""
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for channel in channels:
        name = subscribed_on.pop(channel, None)
        if name is not None:
            grouped[name].append(channel)
    return grouped
