"""The worker runtime: register tasks with @worker.task, then run() pulls them over one
bidirectional stream (conveyor.worker_stream, which also sends the heartbeats) and hands them to
its execution pool (conveyor.pools: threads, child processes or the event loop), reporting
starts and results in batches until the server acks them (conveyor.reports) and obeying cancels.

    worker = Worker(queues=["default"], concurrency=8)     # pool="threads" | "processes" | "async"

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    worker.run_forever()   # SIGINT/SIGTERM: finish in-flight tasks, take no new ones
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from conveyor import __version__, tracing, worker_log
from conveyor import loop as event_loop
from conveyor.client import default_address
from conveyor.context import TaskContext
from conveyor.execution import TaskFunction, to_outcome
from conveyor.pools.base import POOL_KINDS, Pool, PoolKind, TaskCall, make_pool
from conveyor.reports import ResultBatcher, StartedBatcher, UnackedResults, result_batch_size
from conveyor.schema import task_infos
from conveyor.tls import bearer_metadata
from conveyor.v1 import worker_service_pb2
from conveyor.values import to_value
from conveyor.window import FLOOR_PREFETCH, AdaptiveWindow, LiveWindow
from conveyor.worker_stream import WorkerStream

log = logging.getLogger("conveyor.worker")
F = TypeVar("F", bound=TaskFunction)
# Reconnect backoff after the stream breaks.
RECONNECT_INITIAL_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 5.0
# How long graceful shutdown waits for in-flight tasks before handing them back.
DEFAULT_DRAIN_SECONDS = 30.0
# Assignments held per task slot at first, as Celery's default prefetch multiplier: the next
# tasks are already here when a slot frees up. Left unset, prefetch then follows the rate the
# tasks end (conveyor.window); 1 suits long tasks (none wait behind a busy slot).
DEFAULT_PREFETCH = FLOOR_PREFETCH
# Largest message the worker accepts (announced in Hello; the server splits batches to fit).
# gRPC's own default, 4 MiB, is less than a few tasks with args near the 1 MiB limit.
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024


class Worker:
    def __init__(
        self,
        address: str | None = None,
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int = 8,
        prefetch: int | None = None,
        max_in_flight: int | None = None,
        worker_id: str = "",
        drain_timeout: float = DEFAULT_DRAIN_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        pool: PoolKind = "threads",
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 1:
            raise ValueError("prefetch must be at least 1 (or None: sized by the rate its tasks end)")
        if max_receive_bytes < 4 * 1024 * 1024:
            raise ValueError("max_receive_bytes must be at least 4 MiB (gRPC's default)")
        self.address = address or default_address()
        self.queues = list(queues)
        self.concurrency = concurrency
        # None: the window is sized by the rate its tasks end (conveyor.window).
        self.prefetch = prefetch
        # Where tasks run (see conveyor.pools); the child limits apply to the processes pool.
        self.pool: PoolKind = _checked_pool(pool)
        self.max_tasks_per_child = _positive_or_none("max_tasks_per_child", max_tasks_per_child)
        self.max_memory_per_child = _positive_or_none("max_memory_per_child", max_memory_per_child)
        self.max_receive_bytes = max_receive_bytes
        # The window: tasks assigned to this worker and not yet reported. Those beyond
        # `concurrency` wait here for a slot; their STARTED and time limit begin when they run.
        self._fixed_window = max_in_flight
        self._adaptive: AdaptiveWindow | None = None
        self.max_in_flight = self._initial_window()
        self.worker_id = worker_id
        self.drain_timeout = drain_timeout
        self.tasks: dict[str, TaskFunction] = {}
        # Descriptions given to task(); the others default to their docstring's first line.
        self.descriptions: dict[str, str] = {}
        self._credentials = credentials
        self._metadata = bearer_metadata(token)
        self._pool: Pool | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        # The lease tokens of the tasks in _running (running or waiting for a slot), announced in
        # the Hello after a reconnect so that the server keeps their leases with the new stream.
        self._held: dict[str, str] = {}
        self._stream: WorkerStream | None = None
        self._unacked = UnackedResults()
        self._results = ResultBatcher(self._send)
        self._started = StartedBatcher(self._send)
        # The window sized by the tasks (prefetch unset), while run() runs.
        self._live_window: LiveWindow | None = None
        self._stopping: asyncio.Event | None = None
        # The last stream's: set by the server's Welcome.
        self._welcomed = asyncio.Event()

    # -- registration ---------------------------------------------------------------------

    def task(self, name: str | None = None, *, description: str | None = None) -> Callable[[F], F]:
        """Register a sync or async function under `name` (default: the function's name). The
        server's task registry gets its description (default: the docstring's first line) and a
        JSON Schema of its calls derived from its type hints (conveyor.schema)."""

        def register(function: F) -> F:
            task_name = name or function.__name__
            if task_name in self.tasks:
                raise ValueError(f"task {task_name!r} is registered twice")
            self.tasks[task_name] = function
            if description is not None:
                self.descriptions[task_name] = description
            return function

        return register

    def configure(
        self, address: str | None = None, queues: Sequence[str] | None = None, concurrency: int | None = None,
        prefetch: int | None = None, pool: PoolKind | None = None, *,
        max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
    ) -> None:
        """Override settings before run() (the CLI applies its flags this way)."""
        if address:
            self.address = address
        if queues:
            self.queues = list(queues)
        if concurrency:
            self.concurrency = concurrency
        if prefetch:
            self.prefetch = prefetch
        if pool:
            self.pool = _checked_pool(pool)
        if max_tasks_per_child:
            self.max_tasks_per_child = _positive_or_none("max_tasks_per_child", max_tasks_per_child)
        if max_memory_per_child:
            self.max_memory_per_child = _positive_or_none("max_memory_per_child", max_memory_per_child)
        self.max_in_flight = self._initial_window()

    def _describe_window(self) -> str:
        if self._adaptive is not None:
            return (f"prefetch auto (window {self._adaptive.floor}-{self._adaptive.ceiling}, "
                    "deep while tasks are short)")
        if self._fixed_window is not None:
            return f"window {self._fixed_window}"
        return f"prefetch {self.prefetch} (window {self.max_in_flight})"

    def _initial_window(self) -> int:
        if self._fixed_window is not None:
            self._adaptive = None
            return self._fixed_window
        if self.prefetch is not None:
            self._adaptive = None
            return self.concurrency * self.prefetch
        self._adaptive = AdaptiveWindow(self.concurrency)
        return self._adaptive.size

    # -- lifecycle ------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then drain gracefully."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
            await self.run()

        event_loop.run(main())

    def stop(self) -> None:
        """Begin a graceful stop: say Goodbye, finish in-flight tasks, then disconnect."""
        if self._stopping is not None:
            self._stopping.set()

    async def run(self) -> None:
        """Connect (and reconnect after failures) until stop() is called and work is drained."""
        self._stopping = asyncio.Event()
        pool = self._pool = make_pool(
            self.pool, self.concurrency, dict(self.tasks),
            max_tasks_per_child=self.max_tasks_per_child, max_memory_per_child=self.max_memory_per_child,
        )
        await pool.start()
        if self._adaptive is not None:
            self._live_window = LiveWindow(self._adaptive, self._resize_window, lambda: bool(self._running))
        worker_log.banner(__version__, self.address, self.queues, pool.describe(), self.concurrency,
                          self._describe_window(), self.tasks)
        delay = RECONNECT_INITIAL_SECONDS
        try:
            while not self._stopping.is_set():
                try:
                    await self._connect_once()
                    delay = RECONNECT_INITIAL_SECONDS
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                      grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
                        raise
                    if self._welcomed.is_set():
                        delay = RECONNECT_INITIAL_SECONDS  # a healthy connection broke: start the backoff over
                    log.warning("stream to %s broke (%s); reconnecting in %.1f s", self.address, exc.code(), delay)
                if self._stopping.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        finally:
            if self._live_window is not None:
                self._live_window.close()
                self._live_window = None
            for task in list(self._running.values()):
                task.cancel()
            await pool.close()
            self._pool = None

    async def _connect_once(self) -> None:
        """One connection to the server: Hello, then tasks and results until the stream ends."""
        stream = self._stream = WorkerStream(self.address, self._credentials, self._metadata, self.max_receive_bytes)
        self._welcomed = stream.welcomed
        opening = [worker_service_pb2.ConnectRequest(hello=self._hello())]
        if (resend := self._unacked.resend()) is not None:  # results from before a reconnect
            opening.append(resend)
        drainer = asyncio.create_task(self._drain_on_stop())
        try:
            await stream.run(opening, self._on_message)
        finally:
            drainer.cancel()
            self._stream = None

    def _hello(self) -> worker_service_pb2.Hello:
        return worker_service_pb2.Hello(
            worker_id=self.worker_id, language="python", sdk_version=__version__, queues=self.queues,
            task_names=sorted(self.tasks), tasks=task_infos(self.tasks, self.descriptions),
            max_in_flight=self.max_in_flight,
            hostname=socket.gethostname(), pid=os.getpid(), max_receive_bytes=self.max_receive_bytes,
            held=[worker_service_pb2.LeaseRef(task_id=task_id, lease_token=token)
                  for task_id, token in self._held.items()],
        )

    def _send(self, message: worker_service_pb2.ConnectRequest) -> None:
        if self._stream is not None:
            self._stream.send(message)

    async def _drain_on_stop(self) -> None:
        """On stop: Goodbye, wait for in-flight tasks (bounded), then close our side."""
        assert self._stopping is not None
        await self._stopping.wait()
        if self._pool is not None:
            self._pool.drain()  # tasks still waiting for a slot never start: the server hands them on
        self._send(worker_service_pb2.ConnectRequest(goodbye=worker_service_pb2.Goodbye()))
        if self._running:
            log.info("draining: waiting for %d running tasks", len(self._running))
        # Assignments the server sent before it saw the goodbye start late: wait for them too.
        deadline = asyncio.get_running_loop().time() + self.drain_timeout
        while self._running and (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self._running.values()), timeout=remaining)
        if self._running:
            log.warning("%d tasks did not finish in %.0f s; handing them back", len(self._running), self.drain_timeout)
        self._results.flush()
        # Give the server a moment to ack the last results before our side closes.
        for _ in range(50):
            if not self._unacked:
                break
            await asyncio.sleep(0.02)
        if self._stream is not None:
            self._stream.close()

    # -- messages from the server -----------------------------------------------------------

    def _on_message(self, message: worker_service_pb2.ConnectResponse) -> None:
        kind = message.WhichOneof("message")
        if kind == "assignments":
            for assignment in message.assignments.items:
                self._start(assignment)
        elif kind == "acks":
            for ack in self._unacked.acked(message.acks.acks):
                log.info("result of %s not recorded: %s", ack.task_id, worker_service_pb2.AckStatus.Name(ack.status))
        elif kind == "cancel":
            if self._pool is not None:
                for task_id in message.cancel.task_ids:
                    self._pool.cancel(task_id)
        elif kind == "welcome":  # the stream has taken the heartbeat interval
            self.worker_id = message.welcome.worker_id
            # With several replicas' addresses, the replica's id says which one answered.
            log.info("connected to %s (replica %s) as %s", self.address, message.welcome.server_id or "?",
                     self.worker_id)
        elif kind == "drain":
            log.info("server asked to drain: %s", message.drain.reason)
            self.stop()

    def _start(self, assignment: worker_service_pb2.Assignment) -> None:
        task = assignment.task
        function = self.tasks.get(task.name)
        if function is None:
            reason = f"no task named {task.name!r} is registered on this worker (python; has {sorted(self.tasks)})"
            self._send(worker_service_pb2.ConnectRequest(reject=worker_service_pb2.Reject(tasks=[
                worker_service_pb2.RejectedTask(task_id=task.id, lease_token=assignment.lease_token, reason=reason)
            ])))
            return
        context = TaskContext.of(assignment)
        loop = asyncio.get_running_loop()
        context._report = functools.partial(self._progress, loop, assignment)
        call = TaskCall(assignment, context, function, functools.partial(self._began_running, assignment))
        worker_log.received(context)
        self._held[task.id] = assignment.lease_token
        self._running[task.id] = asyncio.create_task(self._run_one(call))

    async def _run_one(self, call: TaskCall) -> None:
        task = call.assignment.task
        attributes = tracing.task_attributes("execute", task.id, task.name, task.queue, call.assignment.attempt)
        assert self._pool is not None
        try:
            with tracing.span(f"execute {task.name}", task.headers, SpanKind.CONSUMER, attributes) as span:
                ending = await self._pool.run(call)
                if ending is not None and ending.error is not None:
                    span.set_status(Status(StatusCode.ERROR, ending.error.message))
        except asyncio.CancelledError:
            return  # shutting down: the server hands the task to another worker
        finally:
            if self._running.get(task.id) is asyncio.current_task():
                del self._running[task.id]
                del self._held[task.id]
            if self._live_window is not None:
                self._live_window.left(task.id)
            self._started.ended(task.id)
        if ending is None:
            return  # never started (draining): it goes back to the queue when the stream closes
        worker_log.ended(call.context, ending)
        outcome = to_outcome(call.assignment, ending)
        self._unacked.hold(outcome)
        if self._live_window is not None:
            self._live_window.ended()
        self._results.add(outcome, others_running=bool(self._running), batch_size=result_batch_size(self.max_in_flight),
                          backlog=len(self._running) >= self.concurrency)

    def _began_running(self, assignment: worker_service_pb2.Assignment) -> None:
        if self._live_window is not None:
            self._live_window.began(assignment.task.id)
        self._started.started(assignment)

    def _resize_window(self, size: int) -> None:
        self.max_in_flight = size
        self._send(worker_service_pb2.ConnectRequest(credit=worker_service_pb2.Credit(max_in_flight=size)))

    def _progress(self, loop: asyncio.AbstractEventLoop, assignment: worker_service_pb2.Assignment, value: Any) -> None:
        """Called from the task: on the loop (async tasks) or from an executor thread (sync ones)."""
        item = worker_service_pb2.ProgressItem(
            task_id=assignment.task.id, lease_token=assignment.lease_token, progress=to_value(value)
        )
        loop.call_soon_threadsafe(
            self._send, worker_service_pb2.ConnectRequest(progress=worker_service_pb2.Progress(items=[item]))
        )


def _checked_pool(pool: str) -> PoolKind:
    for kind in POOL_KINDS:
        if pool == kind:
            return kind
    raise ValueError(f"pool must be one of {', '.join(POOL_KINDS)}, not {pool!r}")


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1 (or None: no limit)")
    return value
