"""A small blocking facade over the asyncio Client, for scripts and non-async code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from conveyor.client import Client, Submittable, Submitted
from conveyor.v1 import result_pb2

T = TypeVar("T")


class SyncClient:
    """Runs an asyncio Client on a private event loop thread.

    `options` are the Client's keyword options: token, credentials, options, and how calls
    that meet an unreachable server or engine are retried (`max_retry_seconds=30.0`, or
    `retry=CallRetry(...)`; see Client).
    """

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="conveyor-client", daemon=True)
        self._thread.start()
        self._client: Client = self._run(self._make(address, options))

    @staticmethod
    async def _make(address: str | None, options: dict[str, Any]) -> Client:
        return Client(address, **options)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def submit(self, target: Submittable | str, *args: Any, **kwargs: Any) -> Submitted:
        return self._run(self._client.submit(target, *args, **kwargs))

    def submit_batch(self, targets: Iterable[Submittable]) -> list[Submitted]:
        return self._run(self._client.submit_batch(list(targets)))

    def get_result(self, task_id: str, wait: float = 0.0) -> result_pb2.TaskResult:
        return self._run(self._client.get_result(task_id, wait))

    def result(self, task_id: str, wait: float = 60.0) -> Any:
        return self._run(self._client.result(task_id, wait))

    def events(self, task_ids: Iterable[str] = (), *, workflow_id: str = "") -> list[result_pb2.TaskEvent]:
        """Every event until the tasks finish (blocking)."""

        async def collect() -> list[result_pb2.TaskEvent]:
            return [e async for e in self._client.watch(list(task_ids), workflow_id=workflow_id)]

        return self._run(collect())

    def cancel(self, task_or_workflow_id: str) -> list[str]:
        return self._run(self._client.cancel(task_or_workflow_id))
