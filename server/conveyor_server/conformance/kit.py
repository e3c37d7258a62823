"""What a scenario works with: the server, the worker under test, the proxy between them, a
client, and the checks scenarios share. A failed check raises ScenarioFailed with the message
the table prints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from conveyor import Client, RetryPolicy, Sig
from conveyor.client import TERMINAL, state_name, value_of
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2

from .processes import ServerProcess, Tokens, WorkerProcess
from .proxy import LinkProxy

T = TypeVar("T")
POLL_SECONDS = 0.05


class ScenarioFailed(Exception):
    """A check failed; the message says what was expected and what was seen."""


def shown(value: Any, limit: int = 80) -> str:
    """A value as a short repr for a message (a 1 MB string would drown the table)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


@dataclass
class Kit:
    server: ServerProcess
    worker: WorkerProcess
    proxy: LinkProxy
    tokens: Tokens
    queue: str
    client: Client
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    startup_timeout: float
    # Every task submitted, so the runner can cancel what a failed scenario left running.
    submitted: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens.admin}"),)

    # -- tasks -------------------------------------------------------------------------------

    async def submit(self, name: str, *args: Any, retry: RetryPolicy | None = None,
                     time_limit: float | None = None) -> str:
        submitted = await self.client.submit(Sig(name, args).set(queue=self.queue, retry=retry, time_limit=time_limit))
        self.submitted.append(submitted.task_id)
        return submitted.task_id

    async def finished(self, task_id: str, call: str, within: float = 15.0) -> result_pb2.TaskResult:
        """The task's record once it ended; ScenarioFailed naming `call` if it did not in time."""
        result = await self.client.get_result(task_id, wait=within)
        if result.state not in TERMINAL:
            raise ScenarioFailed(f"{call} did not finish within {within:g} s (it is {state_name(result.state)}); "
                                 "is the worker running it?")
        return result

    async def value(self, name: str, *args: Any) -> Any:
        """Run the task and return its value; ScenarioFailed unless it succeeded."""
        call = call_text(name, args)
        result = await self.finished(await self.submit(name, *args), call)
        if result.state != result_pb2.TASK_STATE_SUCCESS:
            raise ScenarioFailed(f"{call} ended {state_name(result.state)} "
                                 f"({result.error.type}: {result.error.message}), expected SUCCESS")
        return value_of(result)

    async def expect_value(self, name: str, argument: Any, expected: Any) -> None:
        got = await self.value(name, argument)
        if type(got) is not type(expected) or got != expected:
            raise ScenarioFailed(f"{call_text(name, (argument,))} returned {shown(got)}, expected {shown(expected)}")

    async def started(self, task_id: str, call: str, within: float = 15.0) -> None:
        """Wait until the worker reported the task started."""
        async def running() -> bool:
            state = (await self.client.get_result(task_id)).state
            if state in TERMINAL:
                raise ScenarioFailed(f"{call} ended {state_name(state)} before the kit saw it running")
            return state == result_pb2.TASK_STATE_STARTED

        await self.until(running, within, f"{call} was not reported started within {within:g} s")

    async def inspect(self, task_id: str) -> admin_service_pb2.InspectTaskResponse:
        request = admin_service_pb2.InspectTaskRequest(task_id=task_id)
        return await self.admin.InspectTask(request, metadata=self.metadata)

    # -- workers -----------------------------------------------------------------------------

    async def workers(self) -> list[admin_service_pb2.WorkerInfo]:
        """Workers connected on the kit's queue (the kit's own worker is told by its language)."""
        response = await self.admin.ListWorkers(admin_service_pb2.ListWorkersRequest(), metadata=self.metadata)
        return [info for info in response.workers if self.queue in info.queues and info.language != "conformance-kit"]

    async def connected(self, within: float, why: str) -> admin_service_pb2.WorkerInfo:
        """The worker under test once it is connected; ScenarioFailed with `why` if it is not in time."""
        async def found() -> list[admin_service_pb2.WorkerInfo]:
            self.check_alive()
            try:
                return await self.workers()
            except grpc.aio.AioRpcError:
                return []  # the server is starting

        workers = await self.until(found, within, why)
        return workers[0]

    def check_alive(self) -> None:
        code = self.worker.exit_code()
        if code is not None:
            output = tail(self.worker.output())
            said = f"; its output ends:\n{output}" if output else " and printed nothing"
            raise ScenarioFailed(f"the worker exited with status {code}{said}")

    # -- waiting -----------------------------------------------------------------------------

    async def until(self, condition: Callable[[], Awaitable[T]], within: float, why: str) -> T:
        """Poll `condition` until it is truthy; ScenarioFailed(why) after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            outcome = await condition()
            if outcome:
                return outcome
            if time.monotonic() > deadline:
                raise ScenarioFailed(why)
            await asyncio.sleep(POLL_SECONDS)


def call_text(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(shown(a, 40) for a in args)})"


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip().splitlines()[-lines:])
