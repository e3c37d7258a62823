"""The processes pool (prefork): `concurrency` child processes, each running one task at a time.

A hard time limit or a cancel stops the child running the task (SIGTERM, then SIGKILL after
TERMINATE_GRACE_SECONDS) and a fresh child takes its slot at once; whatever the task does, it
stops. A child that dies mid-task (os._exit, a crash, the OOM killer) fails that task with
WorkerLost. `max_tasks_per_child` and `max_memory_per_child` replace children that ran that
many tasks or grew that large.

Children start with the "forkserver" method: a clean server process, started once, imports the
task modules and forks each child from itself. A child starts in milliseconds with the modules
already imported (a replacement after a kill too), and, unlike a plain fork, it does not inherit
the worker's threads, gRPC channel or event loop, which cannot survive a fork. Where forkserver
does not exist (Windows), "spawn" starts each child as a fresh interpreter instead. Either way
the task functions reach the children by module and name, so they must be defined at the top
level of an importable module, and module-level code must not start threads or open
connections (it runs in the fork server).

Tasks go to idle children in batches, so that a busy worker sends several tasks per write and
gets their results back in one: at least an even share of the tasks waiting, and quick tasks
(by the recent runtimes of their name) in batches of about BATCH_SECONDS of work. A task can
thus wait in a child behind another: with prefetch > 1 as with Celery, and with prefetch=1 only
behind tasks whose name usually runs quickly. Time limits count from the moment the child
starts a task, which the parent reads from shared memory (pipe.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Any

from conveyor.execution import Ending, TaskFunction, cancelled, time_limit_exceeded, worker_lost
from conveyor.pools import child as child_main
from conveyor.pools import pipe
from conveyor.pools.base import PoolKind, TaskCall
from conveyor.values import from_value

log = logging.getLogger("conveyor.worker")
# How often the parent looks at its children (starts, time limits); a hard limit is enforced
# within this much of its due time.
WATCH_SECONDS = 0.05
# A stopped child gets this long to unwind (its `finally` blocks) before SIGKILL.
TERMINATE_GRACE_SECONDS = 2.0
# Most tasks sent to one child in one write.
MAX_BATCH = 64
# Quick tasks go to a child in batches of about this much work (by their recent runtimes): a
# batch then costs one write each way and its results share a message.
BATCH_SECONDS = 0.005
# Runtime assumed for a task name not seen yet: it counts as long, so it is not batched.
UNKNOWN_RUNTIME_SECONDS = 1.0
# Weight of the latest runtime in a task name's running average.
RUNTIME_WEIGHT = 0.2
# A child that exits before it is ready is started again after this long, doubling up to the max.
START_RETRY_SECONDS = 0.5
START_RETRY_MAX_SECONDS = 30.0


def start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass(eq=False)
class _Job:
    call: TaskCall
    ended: asyncio.Future[Ending | None]
    seq: int = 0
    child: _Child | None = None
    started: bool = False
    # Cancelled while queued in its child: if the child starts it anyway, the child is stopped.
    stop_if_started: bool = False
    # The pool drains: the child was asked to skip it; it ends with None if it does.
    draining: bool = False


@dataclass(eq=False)
class _Child:
    process: Any  # multiprocessing.Process of the chosen context
    link: _Link
    shared: Any  # RawArray of pipe.SHARED_SLOTS doubles
    # Tasks sent and not answered yet, in the order the child runs them.
    jobs: deque[_Job] = field(default_factory=deque)
    sent: int = 0
    ready: bool = False  # it said so: tasks go to children that are up, not to one still starting
    retiring: str = ""  # why it takes no more tasks (max tasks, max memory)
    stopping: bool = False  # stopped (SIGTERM) or told to exit
    replaced: bool = False  # a new child already took its slot
    exited: bool = False
    link_closed: bool = False
    gone: bool = False
    kill_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self.ready and not self.jobs and not self.retiring and not self.stopping

    def take(self, seq: int) -> _Job | None:
        for index, job in enumerate(self.jobs):
            if job.seq == seq:
                del self.jobs[index]
                return job
        return None

    def find(self, seq: int) -> _Job | None:
        return next((job for job in self.jobs if job.seq == seq), None)


class _Link:
    """The parent's end of a child's socket, on the event loop: frames in as they arrive, frames
    out without ever blocking (what the child is too busy to read waits in a buffer)."""

    def __init__(self, sock: socket.socket, pool: ProcessPool) -> None:
        self.sock = sock
        self.pool = pool
        self.child: _Child | None = None
        self._reader = pipe.FrameReader()
        self._pending = bytearray()
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, messages: list[pipe.Message]) -> None:
        data = pipe.frame(messages)
        if self._pending:
            self._pending += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the child is gone; its link reports that
        if sent < len(data):
            self._pending += data[sent:]
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._pending)
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            if self.child is not None:
                self.pool._link_closed(self.child)
            return
        for messages in self._reader.feed(data):
            if self.child is not None:
                self.pool._on_messages(self.child, messages)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            if self._pending:
                self._loop.remove_writer(self.sock.fileno())
            self.sock.close()


class ProcessPool:
    kind: PoolKind = "processes"

    def __init__(self, concurrency: int, tasks: dict[str, TaskFunction], *,
                 max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None) -> None:
        self.concurrency = concurrency
        self.tasks = tasks
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.method = start_method()
        self._context: BaseContext | None = None
        self._tasks_blob = b""
        self._children: list[_Child] = []
        self._backlog: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._seq = 0
        self._draining = False
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None
        self._dispatch_scheduled = False
        self._runtimes: dict[str, float] = {}  # recent average runtime by task name
        self._failed_starts = 0  # children in a row that exited before they were ready
        self._all_gone = asyncio.Event()  # set when the pool closes and its last child is gone

    def describe(self) -> str:
        limits = [f"max {self.max_tasks_per_child} tasks" if self.max_tasks_per_child else "",
                  f"max {self.max_memory_per_child / 2**20:.0f} MiB" if self.max_memory_per_child else ""]
        per_child = "; ".join(limit for limit in limits if limit)
        per_child = f"; {per_child} per child" if per_child else ""
        return f"processes ({self.concurrency} child processes, {self.method}{per_child})"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks_blob = _picklable(self.tasks)
        context = multiprocessing.get_context(self.method)
        if self.method == "forkserver":
            modules = {child_main.__name__, *(function.__module__ for function in self.tasks.values())}
            context.set_forkserver_preload(sorted(modules | _main_module()))
            # Starting the fork server imports the task modules: off the event loop.
            from multiprocessing import forkserver  # noqa: PLC0415 - POSIX only

            await asyncio.to_thread(forkserver.ensure_running)
        self._context = context
        for _ in range(self.concurrency):
            self._spawn()
        self._watcher = asyncio.create_task(self._watch())

    def _respawn(self) -> None:
        if not self._closing:
            self._spawn()

    def _spawn(self) -> None:
        assert self._context is not None
        ours, theirs = socket.socketpair()
        shared = self._context.RawArray("d", pipe.SHARED_SLOTS)
        root = logging.getLogger()
        process = self._context.Process(  # type: ignore[attr-defined]
            target=child_main.main, name="conveyor-child", daemon=True,
            args=(theirs, shared, self._tasks_blob, list(sys.path), (root.level, _formatter(root)),
                  self.max_memory_per_child),
        )
        process.start()
        theirs.close()
        link = _Link(ours, self)
        child = _Child(process, link, shared)
        link.child = child
        self._children.append(child)
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, child)

    async def close(self) -> None:
        self._closing = True
        self.drain()
        for child in list(self._children):
            self._stop(child, pipe.STOP_SHUTDOWN)
        if self._children:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), TERMINATE_GRACE_SECONDS + 1.0)
        for child in list(self._children):  # stuck even after SIGKILL: give up on it
            self._gone(child)
        for job in list(self._jobs.values()):
            if not job.ended.done():
                job.ended.set_result(None)
        if self._watcher is not None:
            self._watcher.cancel()

    # -- the pool's calls ---------------------------------------------------------------------

    async def run(self, call: TaskCall) -> Ending | None:
        if self._draining:
            return None
        job = _Job(call, asyncio.get_running_loop().create_future())
        self._jobs[call.task_id] = job
        self._backlog.append(job)
        if not self._dispatch_scheduled:  # after this turn of the loop: what else arrives now joins the batch
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        try:
            return await job.ended
        finally:
            if self._jobs.get(call.task_id) is job:
                del self._jobs[call.task_id]

    def cancel(self, task_id: str) -> None:
        job = self._jobs.get(task_id)
        if job is None or job.ended.done():
            return
        child = job.child
        if child is None:  # still in the backlog: it never starts
            job.ended.set_result(cancelled())
            return
        if self._running(child) is job:
            job.ended.set_result(cancelled(self._wall_start(child)))
            self._stop(child, pipe.STOP_CANCEL)
        elif job.seq > child.shared[pipe.FINISHED_SEQ]:  # queued in the child: it must skip it
            job.ended.set_result(cancelled())
            job.stop_if_started = True
            child.link.send([("skip", job.seq)])

    def drain(self) -> None:
        self._draining = True
        for job in self._backlog:
            if not job.ended.done():
                job.ended.set_result(None)
        self._backlog.clear()
        for child in self._children:
            queued = [job for job in child.jobs if job.seq > child.shared[pipe.STARTED_SEQ] and not job.ended.done()]
            for job in queued:
                job.draining = True
            if queued and not child.stopping:
                child.link.send([("skip", job.seq) for job in queued])

    # -- handing out tasks --------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self._draining:
            return
        idle = [child for child in self._children if child.idle]
        if not idle or not self._backlog:
            return
        share = self._share()
        while self._backlog and idle:
            child = idle.pop()
            batch = min(share, self.max_tasks_per_child - child.sent) if self.max_tasks_per_child else share
            messages: list[pipe.Message] = []
            while self._backlog and len(messages) < batch:
                job = self._backlog.popleft()
                if job.ended.done():
                    continue  # cancelled while it waited
                self._seq += 1
                job.seq, job.child = self._seq, child
                child.jobs.append(job)
                messages.append(("run", job.seq, job.call.assignment.SerializeToString()))
            if messages:
                child.sent += len(messages)
                child.link.send(messages)
            if self.max_tasks_per_child and child.sent >= self.max_tasks_per_child:
                child.retiring = f"it ran max_tasks_per_child ({self.max_tasks_per_child}) tasks"

    def _share(self) -> int:
        """How many waiting tasks an idle child gets. At least an even share, as if every child
        were idle (one that frees up first does not take everything while the others are about
        to free up too); quick tasks in batches of about BATCH_SECONDS of work."""
        even = math.ceil(len(self._backlog) / self.concurrency)
        work = sum(self._runtimes.get(job.call.context.name, UNKNOWN_RUNTIME_SECONDS) for job in self._backlog)
        batched = math.ceil(len(self._backlog) / max(1, math.ceil(work / BATCH_SECONDS)))
        return min(max(even, batched), MAX_BATCH)

    def _on_messages(self, child: _Child, messages: list[pipe.Message]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "done":
                job = child.take(message[1])
                if job is not None:
                    self._learn(job.call.context.name, message[2])
                    if not job.ended.done():
                        job.ended.set_result(message[2])
            elif kind == "skipped":
                job = child.take(message[1])
                if job is not None and not job.ended.done():
                    job.ended.set_result(None if job.draining else cancelled())
            elif kind == "progress":
                job = child.find(message[1])
                if job is not None and not job.ended.done():
                    job.call.context.progress(from_value(message[2]))
            elif kind == "ready":
                child.ready = True
                self._failed_starts = 0
            elif kind == "retire":
                child.retiring = str(message[1])
        if child.retiring and not child.jobs and not child.stopping:
            log.info("replacing child process %s: %s", child.process.pid, child.retiring)
            child.stopping = True
            child.link.send([("exit",)])
        self._dispatch()

    def _learn(self, name: str, ending: Ending) -> None:
        known = self._runtimes.get(name)
        runtime = ending.runtime
        self._runtimes[name] = runtime if known is None else known + RUNTIME_WEIGHT * (runtime - known)

    # -- watching the children ----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            for child in list(self._children):
                if child.jobs and not child.stopping:
                    self._inspect(child)

    def _running(self, child: _Child) -> _Job | None:
        """The job the child is running now, as its shared memory says."""
        started, finished = child.shared[pipe.STARTED_SEQ], child.shared[pipe.FINISHED_SEQ]
        if started <= finished:
            return None
        return child.find(int(started))

    def _wall_start(self, child: _Child) -> float:
        return time.time() - (time.monotonic() - float(child.shared[pipe.STARTED_AT]))

    def _inspect(self, child: _Child) -> None:
        job = self._running(child)
        if job is None:
            return
        if job.ended.done():
            if job.stop_if_started:  # cancelled, but the child started it before it saw the skip
                self._stop(child, pipe.STOP_CANCEL)
            return
        if not job.started:
            job.started = True
            job.call.on_start()
        limit = job.call.context.time_limit
        if limit and time.monotonic() - child.shared[pipe.STARTED_AT] > limit:
            job.ended.set_result(time_limit_exceeded(limit, self._wall_start(child)))
            self._stop(child, pipe.STOP_TIME_LIMIT)

    def _stop(self, child: _Child, reason: float) -> None:
        """SIGTERM the child (SIGKILL after the grace) and give its slot to a new one now."""
        if child.stopping and child.shared[pipe.STOP_REASON]:
            return
        child.stopping = True
        child.shared[pipe.STOP_REASON] = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signal.SIGTERM)
        child.kill_timer = asyncio.get_running_loop().call_later(TERMINATE_GRACE_SECONDS, self._kill, child)
        if not self._closing and not child.replaced:
            child.replaced = True
            self._spawn()

    @staticmethod
    def _kill(child: _Child) -> None:
        if not child.exited:
            log.warning("child process %s did not stop within %g s; killing it", child.process.pid,
                        TERMINATE_GRACE_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signal.SIGKILL)

    # -- a child's end --------------------------------------------------------------------------

    def _exited(self, child: _Child) -> None:
        """The process ended; what it wrote before may still be unread on its socket."""
        asyncio.get_running_loop().remove_reader(child.process.sentinel)
        child.exited = True
        child.process.join(0.1)
        if child.link_closed:
            self._gone(child)
        else:  # its socket ends as soon as we have read it all, unless a process it forked holds it
            asyncio.get_running_loop().call_later(1.0, self._gone, child)

    def _link_closed(self, child: _Child) -> None:
        child.link_closed = True
        if child.exited:
            self._gone(child)
        elif child.kill_timer is None:  # closed its socket yet lives on
            child.kill_timer = asyncio.get_running_loop().call_later(TERMINATE_GRACE_SECONDS, self._kill, child)

    def _gone(self, child: _Child) -> None:
        if child.gone:
            return
        child.gone = True
        if child.kill_timer is not None:
            child.kill_timer.cancel()
        child.link.close()
        if child in self._children:
            self._children.remove(child)
        if not child.exited:
            asyncio.get_running_loop().remove_reader(child.process.sentinel)
        running = self._running(child)
        unexpected = not child.stopping
        requeue: list[_Job] = []
        for job in child.jobs:
            if job.ended.done():
                continue
            if job is running and unexpected:
                job.ended.set_result(worker_lost(f"the child process running it {_exit_text(child.process)}",
                                                 self._wall_start(child)))
            elif job.draining:
                job.ended.set_result(None)
            else:  # never started, or cut short by a stop meant for another task: run it again
                job.child, job.started = None, False
                requeue.append(job)
        child.jobs.clear()
        self._backlog.extendleft(reversed(requeue))
        if unexpected and not self._closing and child.ready:
            log.warning("child process %s %s", child.process.pid, _exit_text(child.process))
        if not child.replaced and not self._closing:
            child.replaced = True
            if child.ready or child.stopping:
                self._spawn()
            else:  # it never came up (an import failing in it?): try again, less and less often
                delay = min(START_RETRY_SECONDS * 2 ** self._failed_starts, START_RETRY_MAX_SECONDS)
                self._failed_starts += 1
                log.error("a child process %s before it was ready; starting another in %g s (its output "
                          "above says why)", _exit_text(child.process), delay)
                asyncio.get_running_loop().call_later(delay, self._respawn)
        with contextlib.suppress(ValueError):  # close() refuses a process still running; it is gone to us
            child.process.close()
        if self._closing and not self._children:
            self._all_gone.set()
        self._dispatch()


def _main_module() -> set[str]:
    """The program's main module, for the fork server to import once: each child runs it again
    (as __mp_main__, which multiprocessing always does), and finds its imports done."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return {spec.name}  # run with -m, e.g. conveyor_server.cli
    return {"__main__"} if getattr(main, "__file__", None) else set()


def _exit_text(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _formatter(root: logging.Logger) -> logging.Formatter | None:
    """The worker's log format, for the children to use too, when it can be sent to them."""
    for handler in root.handlers:
        if handler.formatter is not None:
            try:
                pickle.dumps(handler.formatter)
            except Exception:  # any formatter the child cannot rebuild
                return None
            return handler.formatter
    return None


def _picklable(tasks: dict[str, TaskFunction]) -> bytes:
    for name, function in tasks.items():
        try:
            pickle.dumps(function)
        except Exception as exc:  # the reason goes into the message
            where = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"
            raise ValueError(
                f"task {name!r} ({where}) cannot run in the processes pool: child processes import task "
                f"functions by module and name, so define it at the top level of a module ({exc})"
            ) from None
    return pickle.dumps(tasks)
