"""Chooses a broker or backend engine from its URL; engines are imported only when used."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .backends.base import DEFAULT_TTL_SECONDS, Backend
from .brokers.base import Broker

# scheme -> (module, class). Each class has `from_url(url)` (brokers) or
# `from_url(url, ttl_seconds)` (backends).
BROKERS: dict[str, tuple[str, str]] = {
    "memory": ("conveyor_server.brokers.memory", "MemoryBroker"),
    "sqlite": ("conveyor_server.brokers.sqlite", "SqliteBroker"),
    "redis": ("conveyor_server.brokers.redis", "RedisBroker"),
    "amqp": ("conveyor_server.brokers.amqp", "AmqpBroker"),
    "amqps": ("conveyor_server.brokers.amqp", "AmqpBroker"),
    "sqs": ("conveyor_server.brokers.sqs", "SqsBroker"),
}
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("conveyor_server.backends.memory", "MemoryBackend"),
    "sqlite": ("conveyor_server.backends.sqlite", "SqliteBackend"),
    "redis": ("conveyor_server.backends.redis", "RedisBackend"),
    "mongodb": ("conveyor_server.backends.mongodb", "MongoBackend"),
    "memcached": ("conveyor_server.backends.memcached", "MemcachedBackend"),
}


class EngineError(ValueError):
    """The URL names no engine, or the engine's extra is not installed."""


def _load(table: dict[str, tuple[str, str]], url: str, kind: str) -> type:
    scheme = urlsplit(url).scheme
    if scheme not in table:
        known = ", ".join(f"{name}://" for name in sorted(table))
        raise EngineError(f"unknown {kind} URL {url!r}: the scheme must be one of {known}")
    module_name, class_name = table[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(
            f"the {scheme} {kind} needs an optional dependency: pip install 'conveyor[{scheme}]' ({exc})"
        ) from exc
    engine: type = getattr(module, class_name)
    return engine


def open_broker(url: str) -> Broker:
    """Build (not connect) the broker named by `url`."""
    engine = _load(BROKERS, url, "broker")
    if urlsplit(url).scheme == "memory":
        return engine()  # type: ignore[no-any-return]
    return engine.from_url(url)  # type: ignore[attr-defined,no-any-return]


def open_backend(url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Backend:
    """Build (not connect) the backend named by `url`."""
    engine = _load(BACKENDS, url, "backend")
    if urlsplit(url).scheme == "memory":
        return engine(ttl_seconds)  # type: ignore[no-any-return]
    return engine.from_url(url, ttl_seconds)  # type: ignore[attr-defined,no-any-return]
