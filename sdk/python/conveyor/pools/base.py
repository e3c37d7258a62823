"""What every execution pool offers the worker: run a call from the moment a slot is free, stop
it on a cancel or at its time limits, and say how it ended.

The worker hands each assignment to its pool at once; the pool holds it until a slot is free,
then starts it (calling `on_start`, which reports STARTED), so that time limits count from the
moment a task starts running, never from its delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from conveyor.context import TaskContext
from conveyor.execution import Ending, TaskFunction
from conveyor.v1 import worker_service_pb2

PoolKind = Literal["threads", "processes", "async"]
POOL_KINDS: tuple[PoolKind, ...] = ("threads", "processes", "async")


@dataclass(slots=True, eq=False)
class TaskCall:
    """One assignment on its way through a pool."""

    assignment: worker_service_pb2.Assignment
    context: TaskContext
    function: TaskFunction
    # Called (on the event loop) when the task starts running.
    on_start: Callable[[], None]

    @property
    def task_id(self) -> str:
        return self.assignment.task.id


class Pool(Protocol):
    kind: PoolKind

    def describe(self) -> str:
        """How the pool runs tasks, for the worker's start banner."""
        ...

    async def start(self) -> None:
        """Get ready to run tasks (start child processes); raises when the tasks cannot run here."""
        ...

    async def run(self, call: TaskCall) -> Ending | None:
        """Run `call` once a slot is free. None when it never started because the pool is draining."""
        ...

    def cancel(self, task_id: str) -> None:
        """The server cancelled the task: `run` returns CANCELLED now, whatever the code still does."""
        ...

    def drain(self) -> None:
        """Start nothing more: calls still waiting for a slot return None."""
        ...

    async def close(self) -> None:
        """Stop everything still running (the worker is exiting)."""
        ...


def make_pool(
    kind: PoolKind, concurrency: int, tasks: dict[str, TaskFunction], *,
    max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
) -> Pool:
    # Imported here: each pool module pulls in only what it needs (processes: multiprocessing).
    if kind == "threads":
        from conveyor.pools.threads import ThreadPool  # noqa: PLC0415

        return ThreadPool(concurrency)
    if kind == "async":
        from conveyor.pools.event_loop import AsyncPool  # noqa: PLC0415

        return AsyncPool(concurrency, tasks)
    if kind == "processes":
        from conveyor.pools.processes import ProcessPool  # noqa: PLC0415

        return ProcessPool(concurrency, tasks, max_tasks_per_child=max_tasks_per_child,
                           max_memory_per_child=max_memory_per_child)
    raise ValueError(f"pool must be one of {', '.join(POOL_KINDS)}, not {kind!r}")
