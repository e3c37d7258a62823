"""A small blocking facade over the asyncio Client, for scripts and non-async code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor.client import Client, State, Submittable, Submitted
from conveyor.v1 import result_pb2, task_service_pb2

T = TypeVar("T")


class SyncClient:
    """Runs an asyncio Client on a private event loop thread; the same methods, blocking.

    `options` are the Client's keyword options: token, credentials, options, strict_tasks, and
    how calls that meet an unreachable server or engine are retried (`max_retry_seconds=30.0`,
    or `retry=CallRetry(...)`; see Client).
    """

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="conveyor-client", daemon=True)
        self._thread.start()
        self._client: Client = self._run(self._make(address, options))

    @staticmethod
    async def _make(address: str | None, options: dict[str, Any]) -> Client:
        return Client(address, **options)

    @property
    def address(self) -> str:
        return self._client.address

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run on the client's loop with the caller's context variables (inside a task, the
        running task, whose id becomes the parent of what it submits, and the trace)."""
        context = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            task = self._loop.create_task(coroutine, context=context)
            task.add_done_callback(lambda finished: _settle(finished, done))

        self._loop.call_soon_threadsafe(start)
        return done.result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def submit(self, target: Submittable | str, *args: Any, **kwargs: Any) -> SyncSubmitted:
        return SyncSubmitted(self._run(self._client.submit(target, *args, **kwargs)), self)

    def submit_batch(self, targets: Iterable[Submittable]) -> list[SyncSubmitted]:
        return [SyncSubmitted(s, self) for s in self._run(self._client.submit_batch(list(targets)))]

    def get_result(self, task_id: str, wait: float = 0.0) -> result_pb2.TaskResult:
        return self._run(self._client.get_result(task_id, wait))

    def result(self, task_id: str | Submitted | SyncSubmitted, wait: float = 60.0) -> Any:
        if isinstance(task_id, SyncSubmitted):
            task_id = task_id.submitted
        return self._run(self._client.result(task_id, wait))

    def watch(
        self, task_ids: Iterable[str] = (), *, workflow_id: str = "", until_done: bool = True
    ) -> Iterator[result_pb2.TaskEvent]:
        """State changes as they happen (blocking between them); see Client.watch."""
        return self._iterate(self._client.watch(list(task_ids), workflow_id=workflow_id, until_done=until_done))

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self._run(_next(stream))
            except StopAsyncIteration:
                return

    def events(self, task_ids: Iterable[str] = (), *, workflow_id: str = "") -> list[result_pb2.TaskEvent]:
        """Every event until the tasks finish (blocking)."""
        return self._run(self._client.events(list(task_ids), workflow_id=workflow_id))

    def cancel(self, task_or_workflow_id: str) -> list[str]:
        return self._run(self._client.cancel(task_or_workflow_id))

    def get_workflow(self, workflow_id: str) -> task_service_pb2.GetWorkflowResponse:
        return self._run(self._client.get_workflow(workflow_id))


@dataclass(frozen=True)
class SyncSubmitted:
    """Submitted, for a SyncClient: the same ids, and blocking result(), state(), cancel(), watch()."""

    submitted: Submitted
    client: SyncClient

    @property
    def task_id(self) -> str:
        return self.submitted.task_id

    @property
    def workflow_id(self) -> str:
        return self.submitted.workflow_id

    @property
    def task_ids(self) -> tuple[str, ...]:
        return self.submitted.task_ids

    @property
    def result_id(self) -> str:
        return self.submitted.result_id

    def result(self, timeout: float = 60.0) -> Any:
        return self.client.result(self.submitted, wait=timeout)

    def state(self) -> State:
        return self.client._run(self.submitted.state())

    def cancel(self) -> list[str]:
        return self.client.cancel(self.result_id)

    def watch(self) -> Iterator[result_pb2.TaskEvent]:
        return self.client._iterate(self.submitted.watch())


async def _next(stream: AsyncIterator[T]) -> T:
    return await anext(stream)


def _settle(task: asyncio.Task[T], future: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        future.cancel()
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(task.result())
