"""The SQLite broker's publish fetches for a fetch waiting on this process in the same database
call (brokers/_wakeups.py, Taker): the lone task's publish and the look that takes it were two
calls, each a hop to the database thread, one after the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor_server.brokers import sqlite
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.sqlite import SqliteBroker

LEASE = 30.0
QUEUE = "q"
POLL_SECONDS = sqlite._POLL_SECONDS


@pytest.fixture
async def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqliteBroker]:
    """A broker whose waiting fetches do not poll (for another process's writes) in a test's time."""
    monkeypatch.setattr(sqlite, "_POLL_SECONDS", 60.0)
    engine = SqliteBroker(str(tmp_path / "broker.db"))
    await engine.connect()
    yield engine
    await engine.close()


async def waiting_fetch(broker: SqliteBroker) -> asyncio.Task[list[str]]:
    """A fetch waiting on the drained queue (a first look found it empty)."""
    async def fetch() -> list[str]:
        return [d.message_id for d in await broker.fetch(QUEUE, 10, LEASE, wait_seconds=10.0)]

    task = asyncio.create_task(fetch())
    await asyncio.sleep(0.1)
    assert not task.done()
    return task


def counting_calls(broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch,
                   after: Callable[[], object] = lambda: None) -> list[int]:
    """Counts the broker's database calls from now on; `after` runs once each has returned."""
    calls = [0]
    run = broker._db.run

    async def counted(fn: Callable[[Any], Any]) -> Any:
        calls[0] += 1
        result = await run(fn)
        after()
        await asyncio.sleep(0)
        return result

    monkeypatch.setattr(broker._db, "run", counted)
    return calls


async def test_a_publish_hands_a_waiting_fetch_its_message_in_the_same_database_call(
    broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch = await waiting_fetch(broker)
    calls = counting_calls(broker, monkeypatch)

    await broker.publish(QUEUE, [OutgoingMessage("m1", b"body")])

    assert await asyncio.wait_for(fetch, 1.0) == ["m1"]
    assert calls == [1], "the waiting fetch looked for itself after the publish"


async def test_what_a_publish_took_for_a_fetch_that_left_meanwhile_goes_back_to_the_queue(
    broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch = await waiting_fetch(broker)
    counting_calls(broker, monkeypatch, after=fetch.cancel)  # its worker went away meanwhile

    await broker.publish(QUEUE, [OutgoingMessage("m1", b"body")])
    monkeypatch.undo()

    with pytest.raises(asyncio.CancelledError):
        await fetch
    [delivery] = await broker.fetch(QUEUE, 10, LEASE)  # at once, not after the lease
    assert delivery.message_id == "m1"


async def test_a_delayed_message_published_while_a_fetch_waits_is_fetched_when_due(
    broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "_POLL_SECONDS", POLL_SECONDS)  # how a delayed message is seen due
    fetch = await waiting_fetch(broker)

    await broker.publish(QUEUE, [OutgoingMessage("later", b"body", delay=0.2)])

    assert await asyncio.wait_for(fetch, 2.0) == ["later"]  # when due, by the fetch's own poll
