"""The async pool: every task is a coroutine run on the worker's event loop, at most
`concurrency` at once. A cancel or the hard limit cancels the coroutine; the soft limit raises
SoftTimeLimitExceeded at its current await. Code that blocks the loop stalls the whole worker,
heartbeats included: use it for async I/O only."""

from __future__ import annotations

import inspect

from conveyor.execution import TaskFunction
from conveyor.pools.base import PoolKind
from conveyor.pools.inprocess import InProcessPool


class AsyncPool(InProcessPool):
    kind: PoolKind = "async"

    def __init__(self, concurrency: int, tasks: dict[str, TaskFunction]) -> None:
        super().__init__(concurrency)
        self._tasks = tasks

    def describe(self) -> str:
        return f"async (up to {self.concurrency} coroutines on the event loop)"

    async def start(self) -> None:
        blocking = sorted(name for name, function in self._tasks.items() if not inspect.iscoroutinefunction(function))
        if blocking:
            raise ValueError(
                f"the async pool runs only `async def` tasks; {', '.join(blocking)} "
                f"{'is' if len(blocking) == 1 else 'are'} sync: use pool='threads' or 'processes'"
            )
