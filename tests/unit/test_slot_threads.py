"""The threads pool's hand-over: outcomes come back on the loop, threads start only as calls
need them (never past the limit), and close() lets them all end."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from conveyor.pools.slot_threads import SlotThreads


async def test_a_call_runs_on_another_thread_and_its_value_or_error_comes_back() -> None:
    threads: SlotThreads[object] = SlotThreads(2, "test-slot")
    try:
        assert await threads.submit(threading.get_ident) != threading.get_ident()

        def fails() -> object:
            raise SystemExit(3)  # even a BaseException only ends the call

        with pytest.raises(SystemExit):
            await threads.submit(fails)
        assert await threads.submit(lambda: "still serving") == "still serving"
    finally:
        threads.close()


async def test_threads_start_only_as_calls_need_them_and_never_past_the_limit() -> None:
    threads: SlotThreads[int] = SlotThreads(3, "test-slot")
    try:
        for _ in range(20):  # one call at a time needs one thread
            await threads.submit(threading.get_ident)
        assert len(_alive("test-slot")) == 1
        running, most, lock, release = 0, 0, threading.Lock(), threading.Event()

        def held() -> int:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            release.wait(5)
            with lock:
                running -= 1
            return threading.get_ident()

        calls = [threads.submit(held) for _ in range(7)]
        await asyncio.sleep(0.2)
        assert most == 3 and len(_alive("test-slot")) == 3, "three at once, the others wait their turn"
        release.set()
        assert len(set(await asyncio.gather(*calls))) == 3
    finally:
        threads.close()


async def test_close_ends_idle_threads_at_once_and_a_running_one_when_its_call_returns() -> None:
    threads: SlotThreads[object] = SlotThreads(2, "test-close")
    release = threading.Event()
    running = threads.submit(lambda: release.wait(5))
    second = threads.submit(lambda: None)
    await second
    threads.close()
    await _until(lambda: len(_alive("test-close")) == 1)
    release.set()
    await running
    await _until(lambda: not _alive("test-close"))


def test_a_call_that_returns_after_its_loop_closed_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    raised: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    release = threading.Event()
    threads: SlotThreads[object] = SlotThreads(1, "test-late")

    async def start() -> None:
        threads.submit(lambda: release.wait(5))

    asyncio.run(start())  # the loop closes with the call still running
    release.set()
    time.sleep(0.2)
    assert raised == [] and len(_alive("test-late")) == 1, "the hand-back to a closed loop did not kill the thread"
    threads.close()
    deadline = time.monotonic() + 5
    while _alive("test-late") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive("test-late")


def _alive(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
