"""engines.py: a URL's scheme picks the engine class, which builds itself with from_url."""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path

import pytest

from conveyor_server.backends.base import Backend
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.base import Broker
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.engines import BACKENDS, BROKERS, EngineEntry, EngineError, open_backend, open_broker

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# One URL per registered scheme; building one opens no connection, so no server is needed.
BROKER_URLS = {
    "memory": "memory://",
    "sqlite": "sqlite:///unused-broker.db",
    "redis": "redis://127.0.0.1:1/0?prefix=p",
    "redis+cluster": "redis+cluster://127.0.0.1:1,127.0.0.2:2/?prefix=p",
    "amqp": "amqp://guest:guest@127.0.0.1:1/",
    "amqps": "amqps://guest:guest@127.0.0.1:1/",
    "sqs": "sqs://127.0.0.1:1?region=eu-west-1",
}
BACKEND_URLS = {
    "memory": "memory://",
    "sqlite": "sqlite:///unused-backend.db",
    "redis": "redis://127.0.0.1:1/0?prefix=p",
    "redis+cluster": "redis+cluster://127.0.0.1:1,127.0.0.2:2/?prefix=p",
    "mongodb": "mongodb://127.0.0.1:1/db",
    "memcached": "memcached://127.0.0.1:1",
}


def test_every_registered_scheme_has_a_url_here() -> None:
    assert set(BROKER_URLS) == set(BROKERS) and set(BACKEND_URLS) == set(BACKENDS)


@pytest.mark.parametrize("scheme", sorted(BROKER_URLS))
def test_a_broker_url_builds_its_engine_class(scheme: str) -> None:
    broker = open_broker(BROKER_URLS[scheme])
    assert type(broker).__name__ == BROKERS[scheme].class_name
    assert isinstance(broker, Broker)


@pytest.mark.parametrize("scheme", sorted(BACKEND_URLS))
def test_a_backend_url_builds_its_engine_class(scheme: str) -> None:
    backend = open_backend(BACKEND_URLS[scheme], ttl_seconds=5)
    assert type(backend).__name__ == BACKENDS[scheme].class_name
    assert isinstance(backend, Backend)


async def test_the_memory_engines_take_the_ttl_through_from_url() -> None:
    backend = open_backend("memory://", ttl_seconds=0.05)
    assert isinstance(backend, MemoryBackend) and isinstance(open_broker("memory://"), MemoryBroker)
    await backend.insert({"k": b"v"})
    assert await backend.get(["k"]), "there at first"
    deadline = time.monotonic() + 2.0
    while await backend.get(["k"]):
        assert time.monotonic() < deadline, "a record outlived the ttl_seconds given to from_url"
        await asyncio.sleep(0.01)


def test_an_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(EngineError, match=r"unknown broker URL 'kafka://x'.*amqp://.*sqs://"):
        open_broker("kafka://x")
    with pytest.raises(EngineError, match=r"unknown backend URL 'postgres://x'.*memcached://"):
        open_backend("postgres://x")


def test_every_install_hint_names_an_extra_the_package_has() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for entry in (*BROKERS.values(), *BACKENDS.values()):
        assert not entry.extra or entry.extra in extras, entry


def test_a_missing_client_library_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BROKERS, "amqps", EngineEntry("conveyor_server.brokers.not_installed", "X", "amqp"))
    with pytest.raises(EngineError, match=r"the amqps broker needs .*pip install 'conveyor\[amqp\]'"):
        open_broker("amqps://host/")
