"""Celery on a Redis broker and a Redis result backend, with one noop task.

    celery -A bench.peers.celery_app worker --pool threads --concurrency 8 -Q bench

Every key it writes (queue, bindings, results, pub/sub channels) starts with the prefix from
CONVEYOR_BENCH_PREFIX, through kombu's and the result backend's `global_keyprefix`.
The prefetch multiplier comes from CONVEYOR_BENCH_CELERY_PREFETCH (Celery's default, 4, when
unset). Everything else is Celery's default: JSON, ack before execution, results kept a day.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench.peers import CELERY_PREFETCH_ENV, QUEUE, key_prefix, redis_url

URL = redis_url(11)
PREFIX = key_prefix("celery") + ":"

app: Any = Celery("conveyor_bench", broker=URL, backend=URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=int(os.environ.get(CELERY_PREFETCH_ENV, "4")),
)


def _noop() -> None:
    return None


noop: Any = app.task(name="noop")(_noop)
