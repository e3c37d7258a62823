"""The `expires` and `ignore_result` task options end to end (a server and a worker process), on
SQLite and on Redis (broker and backend, with a key prefix of their own): a task not started by
its expiry never runs and ends EXPIRED (a retry due past it too), its error callbacks and its
chord end as after a failure; a task that ignores its result ends SUCCESS without a value, and
reading that value raises ResultIgnored while waiting for its state works."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import Client, ResultIgnored, RetryPolicy, State, TaskFailed, chord, sig, state_name
from tests.support.cli import conveyor
from tests.support.engine_cluster import Cluster, cluster_client, engine_cluster
from tests.support.processes import eventually, settled

pytestmark = pytest.mark.timeout(240)

WAIT = 60.0
ENGINES = ["sqlite", "redis"]


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server whose broker and backend are both `param`, and one worker of canvas_tasks."""
    with engine_cluster(request, tmp_path_factory, module="tests.e2e.canvas_tasks", concurrency=4) as started:
        yield started


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[Client]:
    async with cluster_client(cluster) as connected:
        yield connected


def label() -> str:
    return uuid.uuid4().hex[:10]


# -- expires -----------------------------------------------------------------------------------------


async def test_a_task_not_started_by_its_expiry_never_runs_and_its_errback_gets_expired(
    client: Client, cluster: Cluster
) -> None:
    name, errors = label(), label()
    # Held back by its countdown past its expiry: it comes up expired.
    late = sig("note", name).set(countdown=1.5, expires=0.5).link_error(sig("note_error", errors))
    submitted = await client.submit(late)
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert (failed.value.state, failed.value.error_type) == ("EXPIRED", "Expired")
    assert await submitted.state() == State.EXPIRED
    await eventually(lambda: cluster.lines(f"error {errors} "), WAIT, "the error callback")
    assert await settled(lambda: cluster.lines(f"error {errors} ")) == [f"error {errors} {submitted.task_id} Expired"]
    assert cluster.lines(f"note {name}") == [], "an expired task never runs"
    ran = await asyncio.to_thread(conveyor, "get", submitted.task_id, address=cluster.server.address)
    assert ran.code == 1 and "ended EXPIRED: Expired" in ran.err, ran


async def test_an_expiry_already_past_at_submit_ends_expired_and_a_later_one_runs(client: Client) -> None:
    past = await client.submit(sig("add", 1, 2).set(expires=datetime.now(UTC) - timedelta(seconds=1)))
    result = await client.get_result(past.task_id, wait=WAIT)
    assert state_name(result.state) == "EXPIRED" and result.attempts == 0
    assert await client.result(await client.submit(sig("add", 1, 2).set(expires=60)), wait=WAIT) == 3


async def test_a_retry_due_after_the_expiry_ends_expired_instead_of_running(client: Client) -> None:
    retried = sig("fail").set(retry=RetryPolicy(max_attempts=5, backoff="fixed", initial=60), expires=20)
    submitted = await client.submit(retried)
    result = await client.get_result(submitted.task_id, wait=WAIT)
    assert state_name(result.state) == "EXPIRED" and result.attempts == 1
    assert [state_name(h.state) for h in result.history][-2:] == ["RETRY", "EXPIRED"]
    assert "retry (attempt 2)" in result.error.message


async def test_a_chord_with_an_expired_member_ends_and_says_why(client: Client) -> None:
    expired = sig("add", 3, 4).set(expires=datetime.now(UTC) - timedelta(seconds=1))
    submitted = await client.submit(chord([sig("add", 1, 2), expired], sig("tsum")))
    with pytest.raises(TaskFailed) as failed:
        await client.result(submitted, wait=WAIT)
    assert failed.value.error_type == "ChordMemberFailed" and "Expired" in failed.value.message
    member = await client.get_result(submitted.task_ids[1])
    assert state_name(member.state) == "EXPIRED"


# -- ignore_result -----------------------------------------------------------------------------------


async def test_an_ignored_result_is_not_stored_and_reading_it_says_so(client: Client) -> None:
    submitted = await client.submit(sig("add", 1, 2).set(ignore_result=True))
    with pytest.raises(ResultIgnored, match="ignores its result"):
        await submitted.result(timeout=WAIT)
    assert await submitted.state() == State.SUCCESS
    stored = await client.get_result(submitted.task_id, wait=WAIT)
    assert state_name(stored.state) == "SUCCESS" and not stored.HasField("result")


async def test_a_failure_of_a_task_that_ignores_its_result_still_raises_task_failed(client: Client) -> None:
    submitted = await client.submit(sig("fail").set(ignore_result=True))
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert failed.value.error_type == "ExpectedException"


async def test_a_chain_ending_in_a_task_that_ignores_its_result_has_no_value_to_read(client: Client) -> None:
    submitted = await client.submit(sig("add", 1, 2) | sig("add", 3).set(ignore_result=True))
    with pytest.raises(ResultIgnored):
        await client.result(submitted, wait=WAIT)
    assert await submitted.state() == State.SUCCESS
