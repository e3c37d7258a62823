"""A task that rejects itself (`conveyor.Reject`, Celery's `Reject`) end to end (a server and a
worker process), on SQLite and on Redis (broker and backend, with a key prefix of their own):
requeue=False fails it for good with "Rejected" (no retry, error callbacks run, a dead letter);
requeue=True runs the same attempt again without a failure, and a task that always requeues
itself fails with "Rejected" after MAX_REQUEUES runs instead of looping forever."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from conveyor import Client, RetryPolicy, TaskFailed, si, sig, state_name
from conveyor_server.core.outcomes import MAX_REQUEUES
from tests.support.cli import conveyor
from tests.support.engine_cluster import Cluster, cluster_client, engine_cluster
from tests.support.processes import eventually, settled

pytestmark = pytest.mark.timeout(240)

WAIT = 60.0
ENGINES = ["sqlite", "redis"]


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server whose broker and backend are both `param`, and one worker of reject_tasks."""
    with engine_cluster(request, tmp_path_factory, module="tests.e2e.reject_tasks", concurrency=4) as started:
        yield started


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[Client]:
    async with cluster_client(cluster) as connected:
        yield connected


def label() -> str:
    return uuid.uuid4().hex[:10]


# -- requeue=False -------------------------------------------------------------------------------------


async def test_a_rejected_task_fails_once_without_retries_runs_its_errback_and_is_a_dead_letter(
    client: Client, cluster: Cluster
) -> None:
    name, errors = label(), label()
    retried = RetryPolicy(max_attempts=3, backoff="fixed", initial=0.1)
    submitted = await client.submit(sig("reject", name).set(retry=retried).link_error(sig("note_error", errors)))
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert (failed.value.state, failed.value.error_type) == ("FAILURE", "Rejected")
    assert failed.value.message == f"refused {name}"
    stored = await client.get_result(submitted.task_id)
    assert stored.attempts == 1, "a rejected task is not retried, whatever its retry policy"
    assert cluster.lines(f"run {name}") == [f"run {name}"]
    await eventually(lambda: cluster.lines(f"error {errors} "), WAIT, "the error callback")
    assert await settled(lambda: cluster.lines(f"error {errors} ")) == [f"error {errors} {submitted.task_id} Rejected"]
    dead = await asyncio.to_thread(conveyor, "dead", "list", address=cluster.server.address)
    assert dead.code == 0 and submitted.task_id in dead.out, dead


async def test_a_rejected_chain_step_fails_the_chain(client: Client, cluster: Cluster) -> None:
    name, after = label(), label()
    submitted = await client.submit(sig("add", 1, 2) | si("reject", name) | si("note", after))
    with pytest.raises(TaskFailed) as failed:
        await client.result(submitted, wait=WAIT)
    assert failed.value.error_type == "Rejected"
    assert cluster.lines(f"note {after}") == [], "the steps after a rejected one do not run"


async def test_an_async_task_requeues_and_rejects_itself_the_same_way(client: Client, cluster: Cluster) -> None:
    name = label()
    submitted = await client.submit(sig("reject_async", name, 1))
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert (failed.value.error_type, failed.value.message) == ("Rejected", "refused after 2 runs")
    assert (await client.get_result(submitted.task_id)).attempts == 1


# -- requeue=True --------------------------------------------------------------------------------------


async def test_a_requeued_task_runs_the_same_attempt_again_and_succeeds(client: Client, cluster: Cluster) -> None:
    name = label()
    submitted = await client.submit(sig("requeue_then_succeed", name, 2))
    assert await submitted.result(timeout=WAIT) == {"runs": 3, "attempt": 1}
    stored = await client.get_result(submitted.task_id)
    assert state_name(stored.state) == "SUCCESS" and stored.attempts == 1
    assert not stored.HasField("error"), "a requeue is not a failure"
    assert [state_name(h.state) for h in stored.history].count("RECEIVED") == 3
    dead = await asyncio.to_thread(conveyor, "dead", "list", address=cluster.server.address)
    assert submitted.task_id not in dead.out


async def test_a_requeued_chain_step_passes_its_result_on(client: Client) -> None:
    submitted = await client.submit(sig("requeue_then_succeed", label(), 1) | sig("identity"))
    assert await client.result(submitted, wait=WAIT) == {"runs": 2, "attempt": 1}


async def test_a_task_that_always_requeues_itself_fails_with_rejected_after_the_cap(
    client: Client, cluster: Cluster
) -> None:
    name, errors = label(), label()
    submitted = await client.submit(sig("requeue_forever", name).link_error(sig("note_error", errors)))
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert failed.value.error_type == "Rejected"
    assert f"requeued itself {MAX_REQUEUES} times" in failed.value.message
    assert len(await settled(lambda: cluster.lines(f"run {name}"))) == MAX_REQUEUES
    await eventually(lambda: cluster.lines(f"error {errors} "), WAIT, "the error callback")
    assert cluster.lines(f"error {errors} ") == [f"error {errors} {submitted.task_id} Rejected"]
