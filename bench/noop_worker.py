"""The worker the benchmarks run: `conveyor worker bench.noop_worker`."""

from conveyor import Worker

worker = Worker(concurrency=64)


@worker.task("noop")
def noop() -> None:
    return None


@worker.task("anoop")
async def anoop() -> None:
    return None
