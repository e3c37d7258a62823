"""A child process of the processes pool: runs the tasks its parent sends, one at a time, in order.

The main thread reads the parent's frames between tasks and runs tasks. Results go back in
frames of their own: the main thread sends them itself just before it waits for more work, and
while it has more tasks queued a sender thread ships them, so a quick task's result never waits
behind a long task. The soft time limit is SIGALRM, raised as SoftTimeLimitExceeded in the task
(async tasks: see coroutines.py). A hard limit or a cancel is the parent's SIGTERM, raised as
_Stopped so the task's `finally` blocks run, and then this process exits (the parent starts a
new one, and sends SIGKILL if this one lingers).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import pickle
import resource
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from types import FrameType
from typing import Any

from conveyor.context import TaskContext, soft_limit_message
from conveyor.errors import SoftTimeLimitExceeded
from conveyor.execution import Ending, TaskFunction, call_sync, ended_by
from conveyor.pools import pipe
from conveyor.pools.coroutines import SOFT_LIMIT, call_async
from conveyor.v1 import worker_service_pb2
from conveyor.values import to_value

# multiprocessing runs the program's main module again in each child (as __mp_main__). The fork
# server has imported it already (to have its imports done), and runpy warns about exactly that.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy",
                        message=r".* found in sys\.modules after import of package")


class _Stopped(BaseException):
    """The parent stopped this child (time limit, cancel, shutdown). A BaseException, so that a
    task's `except Exception` does not swallow it."""


def main(
    sock: socket.socket, shared: Any, tasks: bytes, sys_path: list[str],
    logging_setup: tuple[int, logging.Formatter | None], max_memory: int | None,
) -> None:
    """The child's entry point (the target of its multiprocessing.Process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker drains us
    sys.path[:] = sys_path  # before unpickling: the task functions are imported by module name
    _configure_logging(*logging_setup)
    Child(sock, shared, pickle.loads(tasks), max_memory).serve()


def _configure_logging(level: int, formatter: logging.Formatter | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _peak_memory() -> int:
    """Peak resident memory of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Child:
    def __init__(self, sock: socket.socket, shared: Any, tasks: dict[str, TaskFunction],
                 max_memory: int | None) -> None:
        self.sock = sock
        self.shared = shared
        self.tasks = tasks
        self.max_memory = max_memory
        self.queue: deque[tuple[int, bytes]] = deque()
        self.skipped: set[int] = set()
        self.exiting = False
        self.outbox: list[pipe.Message] = []
        # Guards the outbox and the socket: a frame is written whole by one thread.
        self.lock = threading.Lock()
        self.mail = threading.Condition(self.lock)
        # The main thread is writing a frame: a stop waits until the frame is out.
        self.sending = False
        self.stop_pending = False
        self.alarm_armed = False
        self.soft_limit: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGALRM, self._on_alarm)
        threading.Thread(target=self._sender, name="conveyor-child-sender", daemon=True).start()

    # -- signals (run in the main thread, between two bytecodes) ----------------------------------

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        if not self.shared[pipe.STOP_REASON]:
            return  # not the pool's: the worker itself was asked to stop, and drains its tasks
        if self.sending:
            self.stop_pending = True
            return
        raise _Stopped

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.alarm_armed:
            self.alarm_armed = False
            raise SoftTimeLimitExceeded(soft_limit_message(self.soft_limit))

    # -- the main loop ------------------------------------------------------------------------

    def serve(self) -> None:
        self._post(("ready",), wake_sender=False)  # sent as it waits for its first task
        with contextlib.suppress(_Stopped, EOFError, OSError):  # stopped by the parent, or the parent is gone
            self._serve()
        with contextlib.suppress(_Stopped, OSError):
            self._flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # exiting now: another SIGTERM just ends it

    def _serve(self) -> None:
        while True:
            self._read(wait=not self.queue)
            if not self.queue:
                if self.exiting:
                    return
                continue
            seq, assignment = self.queue.popleft()
            if seq in self.skipped:
                self.skipped.discard(seq)
                self._post(("skipped", seq), wake_sender=bool(self.queue))
                continue
            self._run(seq, assignment)

    def _read(self, wait: bool) -> None:
        if wait:
            self._flush()  # about to wait for work: send the results first
            self._handle(pipe.receive(self.sock))
        while pipe.readable(self.sock):
            self._handle(pipe.receive(self.sock))

    def _handle(self, messages: list[pipe.Message]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "run":
                self.queue.append((message[1], message[2]))
            elif kind == "skip":
                self.skipped.add(message[1])
            elif kind == "exit":
                self.exiting = True

    def _run(self, seq: int, data: bytes) -> None:
        assignment = worker_service_pb2.Assignment.FromString(data)
        context = TaskContext.of(assignment)
        context._report = lambda value: self._post(("progress", seq, to_value(value)), wake_sender=True)
        soft, hard = context.soft_time_limit, context.time_limit
        self.soft_limit = soft if soft and (not hard or soft < hard) else None
        self.shared[pipe.STARTED_AT] = time.monotonic()
        self.shared[pipe.STARTED_SEQ] = seq
        started_at = time.time()
        function = self.tasks.get(assignment.task.name)
        try:
            if function is None:
                ending = ended_by(LookupError(f"no task named {assignment.task.name!r} in the child process"),
                                  started_at)
            elif inspect.iscoroutinefunction(function):
                ending = self._run_async(function, assignment, context)
            else:
                ending = self._run_sync(function, assignment, context)
        except SoftTimeLimitExceeded as late:  # the alarm went off just as the task returned
            ending = ended_by(late, started_at)
        self.shared[pipe.FINISHED_SEQ] = seq
        self._post(("done", seq, ending), wake_sender=bool(self.queue))
        if self.max_memory and (peak := _peak_memory()) > self.max_memory:
            self._post(("retire", f"its memory reached {peak / 2**20:.0f} MiB, over max_memory_per_child "
                                  f"({self.max_memory / 2**20:.0f} MiB)"), wake_sender=False)

    def _run_sync(
        self, function: TaskFunction, assignment: worker_service_pb2.Assignment, context: TaskContext
    ) -> Ending:
        if self.soft_limit:
            self.alarm_armed = True
            signal.setitimer(signal.ITIMER_REAL, self.soft_limit)
        try:
            return call_sync(function, assignment.task, context, passthrough=(_Stopped,))
        finally:
            self.alarm_armed = False
            if self.soft_limit:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _run_async(
        self, function: TaskFunction, assignment: worker_service_pb2.Assignment, context: TaskContext
    ) -> Ending:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        loop, soft = self.loop, self.soft_limit

        async def run() -> Ending:
            work = asyncio.create_task(call_async(function, assignment.task, context))
            alarm = loop.call_later(soft, work.cancel, SOFT_LIMIT) if soft else None
            try:
                return await work
            finally:
                if alarm is not None:
                    alarm.cancel()

        return loop.run_until_complete(run())

    # -- results ------------------------------------------------------------------------------

    def _post(self, message: pipe.Message, wake_sender: bool) -> None:
        """Queue a message for the parent; `wake_sender` when the main thread goes on running tasks."""
        with self.lock:
            self.outbox.append(message)
            if wake_sender:
                self.mail.notify()

    def _flush(self) -> None:
        """Send what is queued, from the main thread."""
        with self.lock:
            if not self.outbox:
                return
            messages, self.outbox = self.outbox, []
            self.sending = True
            try:
                self.sock.sendall(pipe.frame(messages))
            finally:
                self.sending = False
        if self.stop_pending:
            raise _Stopped

    def _sender(self) -> None:
        with self.lock:
            while True:
                while not self.outbox:
                    self.mail.wait()
                messages, self.outbox = self.outbox, []
                try:
                    self.sock.sendall(pipe.frame(messages))
                except OSError:
                    return  # the parent is gone; the main thread finds out too
