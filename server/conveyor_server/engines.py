"""Chooses a broker or backend engine from its URL; engines are imported only when used.

Each engine class builds itself from its URL (`from_url`, part of the Broker and Backend
protocols); this module only maps a URL's scheme to the class, through the registries below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from .backends.base import DEFAULT_TTL_SECONDS, Backend
from .brokers.base import Broker


@dataclass(frozen=True, slots=True)
class EngineEntry:
    """Where an engine class lives, and the package extra its third-party client comes with
    ("" for engines on the standard library alone)."""

    module: str
    class_name: str
    extra: str = ""


# Scheme -> engine. Adding an engine: one line here (CONTRIBUTING.md, "Add a broker/backend").
BROKERS: dict[str, EngineEntry] = {
    "memory": EngineEntry("conveyor_server.brokers.memory", "MemoryBroker"),
    "sqlite": EngineEntry("conveyor_server.brokers.sqlite", "SqliteBroker"),
    "redis": EngineEntry("conveyor_server.brokers.redis", "RedisBroker", "redis"),
    "redis+cluster": EngineEntry("conveyor_server.brokers.redis", "RedisBroker", "redis"),
    "amqp": EngineEntry("conveyor_server.brokers.amqp", "AmqpBroker", "amqp"),
    "amqps": EngineEntry("conveyor_server.brokers.amqp", "AmqpBroker", "amqp"),
    "sqs": EngineEntry("conveyor_server.brokers.sqs", "SqsBroker", "sqs"),
}
BACKENDS: dict[str, EngineEntry] = {
    "memory": EngineEntry("conveyor_server.backends.memory", "MemoryBackend"),
    "sqlite": EngineEntry("conveyor_server.backends.sqlite", "SqliteBackend"),
    "redis": EngineEntry("conveyor_server.backends.redis", "RedisBackend", "redis"),
    "redis+cluster": EngineEntry("conveyor_server.backends.redis", "RedisBackend", "redis"),
    "mongodb": EngineEntry("conveyor_server.backends.mongodb", "MongoBackend", "mongodb"),
    "memcached": EngineEntry("conveyor_server.backends.memcached", "MemcachedBackend", "memcached"),
}


class EngineError(ValueError):
    """The URL names no engine, or the engine's extra is not installed."""


def _load(registry: dict[str, EngineEntry], url: str, kind: str) -> type:
    scheme = urlsplit(url).scheme
    entry = registry.get(scheme)
    if entry is None:
        known = ", ".join(f"{name}://" for name in sorted(registry))
        raise EngineError(f"unknown {kind} URL {url!r}: the scheme must be one of {known}")
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if not entry.extra:
            raise
        raise EngineError(
            f"the {scheme} {kind} needs an optional dependency: pip install 'conveyor[{entry.extra}]' ({exc})"
        ) from exc
    engine: type = getattr(module, entry.class_name)
    return engine


def open_broker(url: str) -> Broker:
    """Build (not connect) the broker named by `url`."""
    engine = _load(BROKERS, url, "broker")
    # A class check (every protocol method present), which also types `engine` for from_url.
    if not issubclass(engine, Broker):
        raise TypeError(f"{engine.__qualname__} does not implement the Broker protocol")
    return engine.from_url(url)


def open_backend(url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Backend:
    """Build (not connect) the backend named by `url`."""
    engine = _load(BACKENDS, url, "backend")
    if not issubclass(engine, Backend):
        raise TypeError(f"{engine.__qualname__} does not implement the Backend protocol")
    return engine.from_url(url, ttl_seconds)
