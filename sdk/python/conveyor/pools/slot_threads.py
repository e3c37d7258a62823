"""Threads that run sync calls handed over from the event loop, each call's outcome set on a
loop future.

A hand-over is one SimpleQueue put and, when the call returns, one call_soon_threadsafe: about
two thirds of the CPU of `loop.run_in_executor` on a ThreadPoolExecutor, whose concurrent future,
chained asyncio future and work item cost more than a noop task itself (`bench/handover.py`).
Threads start as calls need them, up to `limit`; they are daemon threads, so a call that never
returns does not keep the process from exiting (the worker hands such a task back when its
drain times out).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")
_Handover: TypeAlias = tuple[asyncio.AbstractEventLoop, "asyncio.Future[T]", Callable[[], T]]


class SlotThreads(Generic[T]):
    def __init__(self, limit: int, name: str) -> None:
        self._limit = limit
        self._name = name
        self._calls: queue.SimpleQueue[_Handover[T] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Calls handed over and not yet returned (counted on the loop): a thread starts only
        # when every running one is busy.
        self._busy = 0

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._busy += 1
        future.add_done_callback(self._returned)
        if self._busy > len(self._threads) and len(self._threads) < self._limit:
            thread = threading.Thread(target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._calls.put((loop, future, call))
        return future

    def close(self) -> None:
        """Idle threads end; a running call's thread ends when it returns."""
        for _ in self._threads:
            self._calls.put(None)
        self._threads = []

    def _returned(self, _: asyncio.Future[T]) -> None:
        self._busy -= 1

    def _serve(self) -> None:
        while (handover := self._calls.get()) is not None:
            _run(handover)
            handover = None  # hold nothing of a finished call (its outcome included) while waiting


def _run(handover: _Handover[T]) -> None:
    loop, future, call = handover
    try:
        outcome = call()
    except BaseException as error:  # the caller's future carries it, as an executor's would
        _hand_back(loop, _set_exception, future, error)
    else:
        _hand_back(loop, _set_result, future, outcome)


def _hand_back(loop: asyncio.AbstractEventLoop, setter: Callable[..., None], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this call any more
        loop.call_soon_threadsafe(setter, *args)


def _set_result(future: asyncio.Future[T], outcome: T) -> None:
    if not future.done():
        future.set_result(outcome)


def _set_exception(future: asyncio.Future[object], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
