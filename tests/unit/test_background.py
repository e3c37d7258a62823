"""Stopping background tasks: a cancellation that asyncio.wait_for drops (Python 3.11, gh-86296)
must not leave a feed loop running and whoever closes it waiting forever."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from conveyor_server import background
from conveyor_server.background import stop_in_background, stop_tasks
from tests.support.processes import until


class FeedLoop:
    """A watch feed's loop as the engine clients run it: every read sits in asyncio.wait_for."""

    def __init__(self) -> None:
        self.read: asyncio.Future[None] | None = None
        self.reads = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.read = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.read, 10)
            self.reads += 1

    async def reading(self) -> asyncio.Future[None]:
        """The read the loop is waiting on, once it waits."""
        await until(lambda: self.read is not None and not self.read.done(), 30.0, "the loop reading")
        for _ in range(3):  # into wait_for's own wait
            await asyncio.sleep(0)
        assert self.read is not None
        return self.read


async def a_read_answered_as_the_cancel_lands(feed: FeedLoop) -> None:
    (await feed.reading()).set_result(None)  # same loop turn as the cancel that follows


@pytest.mark.looptime
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancellation from 3.12 on")
async def test_one_cancel_is_dropped_when_the_read_completes_in_the_same_turn() -> None:
    """The mechanism itself, so a Python or asyncio change that removes it shows up here."""
    feed = FeedLoop()
    await a_read_answered_as_the_cancel_lands(feed)
    feed.task.cancel()
    await asyncio.sleep(1)
    assert not feed.task.done() and feed.reads >= 1
    await stop_tasks(feed.task)


@pytest.mark.looptime
async def test_stop_tasks_ends_a_loop_whose_first_cancel_was_dropped() -> None:
    feed = FeedLoop()
    await a_read_answered_as_the_cancel_lands(feed)
    await asyncio.wait_for(stop_tasks(feed.task), 30)
    assert feed.task.cancelled()


@pytest.mark.looptime
async def test_stop_in_background_ends_such_a_loop_too_without_waiting_for_it() -> None:
    feed = FeedLoop()
    await a_read_answered_as_the_cancel_lands(feed)
    stop_in_background(feed.task)
    assert background.still_stopping() == 1
    await asyncio.wait_for(asyncio.shield(asyncio.gather(feed.task, return_exceptions=True)), 30)
    assert feed.task.cancelled()
    await until(lambda: not background.still_stopping(), 30.0, "the stopper done")


async def test_stop_tasks_takes_tasks_that_ended_already_or_failed_and_none() -> None:
    async def fail() -> None:
        raise RuntimeError("broken")

    failed = asyncio.create_task(fail())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_tasks(failed, done, None), 1)
    assert failed.done() and done.done()
