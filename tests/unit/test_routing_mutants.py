"""Routing's unroutable count (core/routing.py) at the edge of its memory: a task turned away
exactly UNROUTABLE_MEMORY_SECONDS ago still counts; a moment later it is forgotten."""

from __future__ import annotations

from conveyor_server.core.routing import UNROUTABLE_MEMORY_SECONDS, Unroutable


def test_a_task_counts_as_unroutable_for_exactly_its_memory_and_no_longer() -> None:
    now = [100.0]
    unroutable = Unroutable(clock=lambda: now[0])
    unroutable.turned_away("q", "t1")
    now[0] += UNROUTABLE_MEMORY_SECONDS
    assert unroutable.count("q") == 1
    now[0] += 0.5
    assert unroutable.count("q") == 0


def test_a_task_routed_that_was_never_turned_away_leaves_the_count_alone() -> None:
    unroutable = Unroutable(clock=lambda: 100.0)
    unroutable.turned_away("q", "t1")
    unroutable.routed("q", "t2")  # another task of that queue, never turned away here
    unroutable.routed("other", "t1")  # a queue with nothing turned away
    assert unroutable.count("q") == 1
    unroutable.routed("q", "t1")
    assert unroutable.count("q") == 0
