# mypy: disable-error-code="no-untyped-call"
"""Dramatiq on a Redis broker with the Results middleware on Redis, with one noop actor.

    dramatiq bench.peers.dramatiq_app --processes 1 --threads 8 --queues bench

The broker's namespace is the prefix from CONVEYOR_BENCH_PREFIX and the results live under
"<prefix>:results:" (readable keys), so every key it writes starts with the prefix.
Everything else is Dramatiq's default middleware and settings (prefetch = 2 x threads).
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench.peers import QUEUE, key_prefix, redis_url

URL = redis_url(12)
PREFIX = key_prefix("dramatiq")

broker = RedisBroker(url=URL, namespace=PREFIX)
backend = RedisBackend(url=URL, namespace=f"{PREFIX}:results", use_namespace_prefix_keys=True)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


def _noop() -> None:
    return None


noop = dramatiq.actor(actor_name="noop", queue_name=QUEUE, store_results=True)(_noop)
