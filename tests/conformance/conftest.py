"""Engine parametrisation for the conformance suites.

To add an engine, add its name below and provide a fixture `<name>_broker_url` or
`<name>_backend_url` (returning the engine's URL) in tests/fixtures/. Every test then runs
against it. Tests must use unique queue names and key prefixes, so a server may be shared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor_server.backends.base import Backend
from conveyor_server.brokers.base import Broker
from conveyor_server.engines import open_backend, open_broker

# sqs runs on moto with receives serialised; sqs_racy without (duplicate deliveries, as real SQS
# standard queues have); sqs_fifo and sqs_bands10 with the URL options fifo=1 and bands=10;
# redis_cluster on a three-master Redis Cluster started on loopback (tests/fixtures/redis_cluster.py).
BROKER_ENGINES = [
    "memory", "sqlite", "redis", "redis_cluster", "amqp", "sqs", "sqs_racy", "sqs_fifo", "sqs_bands10",
]
BACKEND_ENGINES = ["memory", "sqlite", "redis", "redis_cluster", "mongodb", "memcached"]


def _engine_url(request: pytest.FixtureRequest, fixture_name: str) -> str:
    try:
        url: str = request.getfixturevalue(fixture_name)
    except pytest.FixtureLookupError:
        # Only for engines whose fixture is not written yet. Once it exists, CI must run the
        # engine for real: its fixture must not skip there when the service is unavailable.
        pytest.skip(f"no `{fixture_name}` fixture yet (to be provided in tests/fixtures/)")
    return url


def is_shared(url: str) -> bool:
    """Whether two instances opened on `url` see the same data (all engines but memory)."""
    return not url.startswith("memory:")


@pytest.fixture
def memory_broker_url() -> str:
    return "memory://"


@pytest.fixture
def sqlite_broker_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
def memory_backend_url() -> str:
    return "memory://"


@pytest.fixture
def sqlite_backend_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'backend.db'}"


# Known gaps of an engine variant: (engine, test) -> (reason, strict). The test still runs, as
# an expected failure (XPASS in the summary once it passes: then drop the entry); a strict one
# that passes fails the run. Not strict while the SQS broker is being reworked.
_FIFO_GROUP = ("SQS FIFO: the broker puts messages without a group in one group ('default'), and SQS hands "
               "out nothing more of a group while any of it is leased, so a fetch gets at most one "
               "receive's worth (10) until those are acked")
KNOWN_GAPS: dict[tuple[str, str], tuple[str, bool]] = {
    ("sqs_fifo", "test_batches"): (_FIFO_GROUP, False),
    ("sqs_fifo", "test_two_consumers_never_share_a_lease"): (_FIFO_GROUP, False),
    ("sqs_fifo", "test_shorter_delay_first"): (_FIFO_GROUP, False),
    ("sqs_fifo", "test_purge_and_stats"): (_FIFO_GROUP + "; purge cannot take the ready ones behind a lease", False),
    ("sqs_fifo", "test_lease_expiry_brings_message_back"): (
        "SQS FIFO on moto: a message leased for 0.5 s (1 s in SQS) comes back at once, with a second receive", False),
    ("sqs_bands10", "test_shorter_delay_first"): (
        "SQS bands=10: the fetch that gets the 0.3 s message returns only with the 1.2 s one too", False),
}


@pytest.fixture(params=BROKER_ENGINES)
def broker_url(request: pytest.FixtureRequest) -> str:
    gap = KNOWN_GAPS.get((request.param, request.node.originalname))
    if gap is not None:
        reason, strict = gap
        request.applymarker(pytest.mark.xfail(reason=reason, strict=strict))
    return _engine_url(request, f"{request.param}_broker_url")


@pytest.fixture(params=BACKEND_ENGINES)
def backend_url(request: pytest.FixtureRequest) -> str:
    return _engine_url(request, f"{request.param}_backend_url")


@pytest.fixture
def shared_broker_url(broker_url: str) -> str:
    if not is_shared(broker_url):
        pytest.skip("each memory broker instance has its own queues")
    return broker_url


@pytest.fixture
def shared_backend_url(backend_url: str) -> str:
    if not is_shared(backend_url):
        pytest.skip("each memory backend instance has its own records")
    return backend_url


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    engine = open_broker(broker_url)
    await engine.connect()
    yield engine
    await engine.close()


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    engine = open_backend(backend_url)
    await engine.connect()
    yield engine
    await engine.close()


@pytest.fixture
def queue() -> str:
    return f"conformance-{uuid.uuid4().hex}"


@pytest.fixture
def prefix() -> str:
    return f"conformance:{uuid.uuid4().hex}:"
