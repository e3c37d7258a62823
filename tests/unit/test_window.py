"""The adaptive window (conveyor.window): deep while tasks end quickly, back to four per slot when
they run long, when the worker idles or when they end slowly."""

from __future__ import annotations

import asyncio

from conveyor.window import (
    CHECK_SECONDS,
    IDLE_SECONDS,
    LONG_TASK_SECONDS,
    MAX_WINDOW,
    RATE_PERIOD_SECONDS,
    WAIT_BUDGET_SECONDS,
    AdaptiveWindow,
    LiveWindow,
)


def _end_at_rate(window: AdaptiveWindow, start: float, rate: float, seconds: float) -> tuple[float, list[int]]:
    """Tasks end `rate` a second for `seconds` (none running long); returns the clock and the
    windows announced."""
    announced: list[int] = []
    now = start
    for _ in range(round(rate * seconds)):
        now += 1 / rate
        if (size := window.ended(now, running_since=now)) is not None:
            announced.append(size)
    return now, announced


def test_bounds_are_four_and_sixty_four_per_slot_and_a_thousand_in_all() -> None:
    one = AdaptiveWindow(1)
    assert (one.floor, one.ceiling, one.size) == (4, 64, 4)
    eight = AdaptiveWindow(8)
    assert (eight.floor, eight.ceiling) == (32, 512)
    assert AdaptiveWindow(100).ceiling == MAX_WINDOW


def test_quick_tasks_deepen_it_by_littles_law() -> None:
    window = AdaptiveWindow(1)
    # 400 tasks/s: a prefetched task waits for the tasks ahead of it, 20 in the wait budget.
    now, announced = _end_at_rate(window, 0.0, 400, 1.0)
    assert window.size == 1 + 400 * WAIT_BUDGET_SECONDS == 21
    assert announced == [21], "one Credit, not one per period"
    _, announced = _end_at_rate(window, now, 10_000, 0.5)
    assert window.size == 64 and announced[-1] == 64, "capped at 64 per slot"
    assert len(announced) <= 2, "the period that spans the change may announce a step between"


def test_slow_tasks_keep_it_at_the_floor() -> None:
    window = AdaptiveWindow(8)
    # 8 slots of 200 ms tasks: 40 a second, 8 + 2 < 32.
    _, announced = _end_at_rate(window, 0.0, 40, 2.0)
    assert window.size == 32 and announced == []


def test_small_changes_send_no_credit() -> None:
    window = AdaptiveWindow(1)
    now, _ = _end_at_rate(window, 0.0, 800, 0.5)
    assert window.size == 41
    _, announced = _end_at_rate(window, now, 920, 0.5)  # 47: less than a quarter more
    assert announced == [] and window.size == 41


def test_a_task_running_past_the_budget_brings_it_back_at_once() -> None:
    window = AdaptiveWindow(2)
    now, _ = _end_at_rate(window, 0.0, 5_000, 0.5)
    assert window.deep
    # The periodic check sees a task running for longer than the budget.
    assert window.check(now, running_since=now - LONG_TASK_SECONDS / 2, holding=True) is None
    assert window.check(now, running_since=now - LONG_TASK_SECONDS * 1.01, holding=True) == 8
    assert not window.deep
    # Quick tasks that end beside the long one do not deepen it again while it runs.
    long_since = now - LONG_TASK_SECONDS
    for n in range(1, 2_000):
        assert window.ended(now + n / 5_000, running_since=long_since) is None
    assert window.size == 8


def test_an_idle_worker_falls_back_to_the_floor() -> None:
    window = AdaptiveWindow(1)
    now, _ = _end_at_rate(window, 0.0, 5_000, 0.5)
    assert window.deep
    # Holding nothing for a moment (a one-slot worker waiting for its refill) is not idle.
    assert window.check(now + IDLE_SECONDS / 2, running_since=None, holding=False) is None
    assert window.check(now + IDLE_SECONDS, running_since=None, holding=False) == 4
    # The next burst has to earn a deep window again: its first period measures from the reset.
    assert window.ended(now + 0.5, running_since=None) is None
    assert window.ended(now + 0.5 + RATE_PERIOD_SECONDS, running_since=None) is None
    assert window.size == 4


def _deepened(start: float) -> AdaptiveWindow:
    """A one-slot window made deep by quick tasks ending up to `start`."""
    window = AdaptiveWindow(1)
    _end_at_rate(window, start - 0.5, 5_000, 0.5)
    assert window.deep
    return window


async def test_a_live_window_on_the_loop_falls_back_when_a_task_runs_long() -> None:
    resized: list[int] = []
    live = LiveWindow(_deepened(asyncio.get_running_loop().time()), resized.append, holding=lambda: True)
    live.began("long")
    live.ended()  # another task ends beside it: the window stays deep, and is checked from now on
    try:
        await asyncio.sleep(LONG_TASK_SECONDS / 2)
        assert resized == [], "not long yet"
        await asyncio.sleep(LONG_TASK_SECONDS / 2 + 2 * CHECK_SECONDS)
        assert resized == [4]
        live.left("long")
    finally:
        live.close()


async def test_a_live_window_falls_back_when_the_worker_holds_nothing() -> None:
    resized: list[int] = []
    live = LiveWindow(_deepened(asyncio.get_running_loop().time()), resized.append, holding=lambda: False)
    live.ended()
    try:
        await asyncio.sleep(IDLE_SECONDS + 2 * CHECK_SECONDS)
        assert resized == [4]
    finally:
        live.close()
