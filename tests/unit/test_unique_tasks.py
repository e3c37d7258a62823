"""Unique tasks (issue #15 item 5) on the memory engines: while a task with the same unique key
is live and within its unique_for, another submit gets its id; once it ends (or unique_for
passes) the key is free again. Two replicas submitting at once create one task."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import task_pb2, worker_service_pb2
from conveyor_server.core.errors import InvalidArgument
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def unique(task_id: str, *args: int, seconds: float = 60.0, key: str = "") -> task_pb2.Signature:
    return task(name="sync", task_id=task_id, args=[task_pb2.Value(int_value=a) for a in args],
                unique_for=Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9)), unique_key=key)


async def submitted_id(replicas: Replicas, signature: task_pb2.Signature) -> str:
    (response,) = await submit(replicas.a, lone(signature))
    return response.task_id


async def test_an_equal_task_submitted_while_one_is_live_gets_its_id(replicas: Replicas) -> None:
    assert await submitted_id(replicas, unique("t1", 7)) == "t1"
    assert await submitted_id(replicas, unique("t2", 7)) == "t1"
    assert await replicas.a.store.get("t2") is None, "no second task was stored"
    # Other arguments make another task; so does the same call without unique_for.
    assert await submitted_id(replicas, unique("t3", 8)) == "t3"
    assert await submitted_id(replicas, task(name="sync", task_id="t4", args=[task_pb2.Value(int_value=7)])) == "t4"


async def test_the_key_is_released_when_the_task_ends(replicas: Replicas) -> None:
    await submitted_id(replicas, unique("t1", 7))
    claim = await lease_all(replicas.a)
    # Still running: unique.
    assert await submitted_id(replicas, unique("t2", 7)) == "t1"
    await replicas.a.connections.recorder.record([outcome(claim, "t1", worker_service_pb2.OUTCOME_SUCCESS)], "w1")
    assert await submitted_id(replicas, unique("t3", 7)) == "t3"
    assert await submitted_id(replicas, unique("t4", 7)) == "t3"


async def test_the_key_is_released_when_unique_for_has_passed(replicas: Replicas) -> None:
    manual = ManualClock()
    replicas.a.submitter.clock = manual.clock  # it stamps the holder's submit and times unique_for from it
    await submitted_id(replicas, unique("t1", 7, seconds=0.2))
    assert await submitted_id(replicas, unique("t2", 7, seconds=0.2)) == "t1"
    manual.advance(0.25)
    assert await submitted_id(replicas, unique("t3", 7, seconds=0.2)) == "t3"


async def test_an_explicit_unique_key_joins_different_calls(replicas: Replicas) -> None:
    assert await submitted_id(replicas, unique("t1", 1, key="report:42")) == "t1"
    assert await submitted_id(replicas, unique("t2", 2, key="report:42")) == "t1"


async def test_two_replicas_submitting_at_once_create_one_task(replicas: Replicas) -> None:
    answers = await asyncio.gather(
        replicas.a.submitter.submit([lone(unique("a1", 5))]), replicas.b.submitter.submit([lone(unique("b1", 5))]),
    )
    ids = {responses[0].task_id for responses in answers}
    assert len(ids) == 1
    stored = [t for t in ("a1", "b1") if await replicas.a.store.get(t) is not None]
    assert stored == list(ids)


async def test_repeats_within_one_batch_are_one_task(replicas: Replicas) -> None:
    responses = await submit(replicas.a, lone(unique("t1", 3)), lone(unique("t2", 3)))
    assert [r.task_id for r in responses] == ["t1", "t1"]


@pytest.mark.parametrize(("signature", "message"), [
    (task(task_id="x", unique_for=Duration(seconds=-1)), "unique_for must be positive"),
    (task(task_id="x", unique_key="k"), "unique_key needs unique_for"),
])
async def test_bad_unique_settings_are_refused(replicas: Replicas, signature: task_pb2.Signature, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await submit(replicas.a, lone(signature))
