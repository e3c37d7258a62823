"""The peer systems bench/compare.py measures Conveyor against, one module each.

Each module reads its Redis URL and key prefix from the environment, so the benchmark's
client and the worker process it starts (which imports the same module) agree on them.
"""

import os

URL_ENV = "CONVEYOR_BENCH_REDIS_URL"
PREFIX_ENV = "CONVEYOR_BENCH_PREFIX"
# Celery's worker_prefetch_multiplier (bench/compare.py --celery-prefetch; Celery's default is 4).
CELERY_PREFETCH_ENV = "CONVEYOR_BENCH_CELERY_PREFETCH"
# The queue every peer's noop task goes to (a Redis key under the prefix, never a shared name).
QUEUE = "bench"


def redis_url(default_db: int) -> str:
    return os.environ.get(URL_ENV, f"redis://127.0.0.1:6379/{default_db}")


def key_prefix(system: str) -> str:
    return os.environ.get(PREFIX_ENV, f"convbench-{system}")
