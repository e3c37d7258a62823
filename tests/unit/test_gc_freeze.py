"""gc_freeze.py: what exists when the server is up is left out of every later collection."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from conveyor_server.gc_freeze import freeze_startup_objects


def tracked(thing: object) -> bool:
    """Whether a collection would walk `thing` (the frozen generation is not among those listed)."""
    return any(found is thing for found in gc.get_objects())


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process keeps collecting everything, as before


@pytest.mark.usefixtures("unfrozen_after")
def test_objects_alive_at_startup_are_frozen_and_later_ones_are_not() -> None:
    built_at_startup: list[object] = [object()]
    assert tracked(built_at_startup)

    frozen = freeze_startup_objects()
    built_later: list[object] = [object()]

    # Not compared with get_freeze_count() now: a frozen object freed meanwhile leaves the count.
    assert frozen > 0
    assert not tracked(built_at_startup)
    assert tracked(built_later)


@pytest.mark.usefixtures("unfrozen_after")
def test_garbage_left_by_startup_is_collected_not_frozen() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    collected_before = sum(stats["collected"] for stats in gc.get_stats())
    del cycle

    freeze_startup_objects()

    assert sum(stats["collected"] for stats in gc.get_stats()) > collected_before
