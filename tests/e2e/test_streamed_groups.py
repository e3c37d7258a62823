"""Generator groups end to end (issue 16): a server and a worker process on SQLite and on Redis.
A 100,000-member group from a generator is submitted with the SDK while the client's memory
stays bounded (tracemalloc peak against the same members held as a list), and every member
succeeds; a chord over a generator fires its callback once with every value in order; a streamed
submit cancelled midway leaves nothing that runs."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from conveyor import Client, chord, group, sig, state_name
from conveyor.canvas import Canvas
from conveyor.client import TERMINAL
from tests.support.engine_cluster import Cluster, cluster_client, engine_cluster
from tests.support.processes import log_lines, settled

pytestmark = pytest.mark.timeout(900)

ENGINES = ["sqlite", "redis"]
# The issue asks for 100,000 (CONVEYOR_TEST_STREAM_MEMBERS=100000: 147 s on SQLite, 343 s on Redis here);
# CI runs 20,000, which still makes a list of the members far outweigh what streaming holds.
MEMBERS = int(os.environ.get("CONVEYOR_TEST_STREAM_MEMBERS", "20000"))
WAIT = 600.0
# How often the 100,000-member group's result is read while it runs.
POLL_SECONDS = 5.0


@pytest.fixture(scope="class", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with engine_cluster(request, tmp_path_factory, module="tests.e2e.stream_tasks", concurrency=64) as started:
        yield started


def echoes(count: int, prefix: str) -> Iterator[Canvas]:
    return (sig("stream.echo", i).set(id=f"{prefix}-{i}") for i in range(count))


def list_peak(count: int, prefix: str) -> int:
    """What holding the same members as a list takes (tracemalloc peak, bytes)."""
    tracemalloc.start()
    try:
        members = list(echoes(count, prefix))
        peak = tracemalloc.get_traced_memory()[1]
        del members
        return peak
    finally:
        tracemalloc.stop()


async def polled_result(client: Client, workflow_id: str) -> object:
    """The workflow's value, read every few seconds until it ended: a long server-side wait on a
    100,000-task workflow would combine its records again as each batch of members ends."""
    deadline = time.monotonic() + WAIT
    while (result := await client.get_result(workflow_id)).state not in TERMINAL:
        assert time.monotonic() < deadline, f"workflow {workflow_id} still {state_name(result.state)} after {WAIT} s"
        await asyncio.sleep(POLL_SECONDS)
    return await client.result(workflow_id, wait=0)


class TestGeneratorGroups:
    @pytest.fixture
    async def client(self, cluster: Cluster) -> AsyncIterator[Client]:
        async with cluster_client(cluster) as connected:
            yield connected

    @pytest.mark.slow  # 100,000 tasks: minutes on SQLite under load
    async def test_a_hundred_thousand_member_generator_group_runs_with_bounded_client_memory(
        self, client: Client
    ) -> None:
        prefix = uuid.uuid4().hex[:8]
        as_list = list_peak(MEMBERS, "list")
        tracemalloc.start()
        try:
            submitted = await client.submit(group(echoes(MEMBERS, prefix)))
            streamed = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert streamed < as_list / 10, f"streaming peaked at {streamed} bytes; the list takes {as_list}"
        assert await polled_result(client, submitted.workflow_id) == list(range(MEMBERS))
        last = await client.get_result(f"{prefix}-{MEMBERS - 1}")
        assert last.workflow_id == submitted.workflow_id

    async def test_a_chord_over_a_generator_fires_once_with_every_value_in_order(
        self, client: Client, cluster: Cluster
    ) -> None:
        label = uuid.uuid4().hex[:8]
        members = (sig("stream.echo", i) for i in range(5_000))
        submitted = await client.submit(chord(members, sig("stream.gather", label)))
        assert await client.result(submitted, wait=WAIT) == list(range(5_000))
        assert await settled(lambda: log_lines(cluster.log_file, f"gather {label} ")) == [f"gather {label} 5000"]

    async def test_a_streamed_submit_cancelled_midway_leaves_nothing_that_runs(
        self, client: Client, cluster: Cluster
    ) -> None:
        prefix = uuid.uuid4().hex[:8]

        def members() -> Iterator[Canvas]:
            for i in range(5_000):
                if i == 2_500:  # two pieces went out: the caller gives up (as on a timeout)
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()
                yield sig("stream.echo", i).set(id=f"{prefix}-{i}")

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(client.submit(chord(members(), sig("stream.gather", prefix))))

        async def stored(task_id: str) -> bool:
            try:
                await client.get_result(task_id)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                return False
            return True

        assert not any([await stored(f"{prefix}-{i}") for i in (0, 999, 1_999, 2_499)])
        # A later streamed submit on the same connection runs to its end; the abandoned one still
        # has nothing stored, and its callback never ran.
        later = await client.submit(group(sig("stream.echo", i) for i in range(2_000)))
        assert await client.result(later, wait=WAIT) == list(range(2_000))
        assert not any([await stored(f"{prefix}-{i}") for i in (0, 999, 1_999, 2_499)])
        assert log_lines(cluster.log_file, f"gather {prefix} ") == []
