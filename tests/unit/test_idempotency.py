"""Idempotency keys: one key, one task, whichever replica a submit goes through and however
many submits race; a key whose task was never stored (its submitter died between the two
writes) is taken over by the next submit."""

from __future__ import annotations

import asyncio

import pytest

from conveyor_server.core.errors import Unavailable
from conveyor_server.core.records import idempotency_key, task_key
from tests.support.loop_time import loop_clock
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def task_records(replicas: Replicas) -> list[str]:
    return sorted(key for key in replicas.backend._records if key.startswith("task:"))


async def test_two_replicas_submitting_one_key_at_once_make_one_task(replicas: Replicas) -> None:
    first, second = await asyncio.gather(
        submit(replicas.a, lone(task("charge", idempotency_key="order-42"))),
        submit(replicas.b, lone(task("charge", idempotency_key="order-42"))),
    )
    assert first[0].task_id == second[0].task_id
    assert list(second[0].task_ids) == [first[0].task_id]
    assert task_records(replicas) == [task_key(first[0].task_id)], "one record"
    assert replicas.broker.published[first[0].task_id] == 1, "published once"
    assert sum(replicas.broker.published.values()) == 1


@pytest.mark.looptime  # B's waits for A's record are asyncio sleeps: no real time on the fake clock
async def test_a_submit_whose_record_write_is_slow_is_not_taken_over_by_a_concurrent_one(
    replicas: Replicas,
) -> None:
    replicas.b.submitter.clock = loop_clock()  # and B's deadline for them on the same (fake) time
    slow_a = asyncio.Event()
    replicas.backend.hold_after_insert("idem:", slow_a)  # A's key is in; A stalls before its records

    async def b_meanwhile() -> list[str]:
        await asyncio.sleep(0)  # A first
        try:
            return [r.task_id for r in await submit(replicas.b, lone(task("charge", idempotency_key="k")))]
        finally:
            slow_a.set()

    first, second = await asyncio.gather(
        submit(replicas.a, lone(task("charge", idempotency_key="k"))), b_meanwhile(), return_exceptions=True
    )
    # B is told to retry (UNAVAILABLE, which the SDK retries) rather than create a second task;
    # once A's record is stored, B's retry gets A's task.
    assert isinstance(second, Unavailable)
    assert not isinstance(first, BaseException)
    [again] = await submit(replicas.b, lone(task("charge", idempotency_key="k")))
    assert again.task_id == first[0].task_id
    assert len(task_records(replicas)) == 1


async def test_a_key_seen_before_answers_with_the_first_task_and_submits_nothing(replicas: Replicas) -> None:
    [first] = await submit(replicas.a, lone(task("charge", idempotency_key="k")))
    [again] = await submit(replicas.b, lone(task("charge", task_id="other-id", idempotency_key="k")))
    assert again.task_id == first.task_id and list(again.task_ids) == [first.task_id]
    assert task_records(replicas) == [task_key(first.task_id)]
    assert "other-id" not in replicas.broker.published


async def test_repeats_of_a_key_within_one_batch_share_the_first_task(replicas: Replicas) -> None:
    responses = await submit(
        replicas.a,
        lone(task("charge", task_id="x1", idempotency_key="k")),
        lone(task("charge", task_id="y1")),
        lone(task("charge", task_id="x2", idempotency_key="k")),
        lone(task("charge", task_id="z1", idempotency_key="other")),
    )
    assert [r.task_id for r in responses] == ["x1", "y1", "x1", "z1"]
    assert task_records(replicas) == [task_key(t) for t in ("x1", "y1", "z1")]


async def test_a_batch_of_only_known_keys_writes_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task("charge", task_id="x1", idempotency_key="k")))
    writes = dict(replicas.backend._records)
    [again] = await submit(replicas.b, lone(task("charge", task_id="x2", idempotency_key="k")))
    assert again.task_id == "x1"
    assert replicas.backend._records.keys() == writes.keys()


async def test_a_key_whose_task_was_never_stored_is_taken_over(replicas: Replicas) -> None:
    # A submitter wrote the key, then died before writing its task's record.
    await replicas.backend.insert({idempotency_key("k"): b"never-stored"}, keep=True)
    [response] = await submit(replicas.a, lone(task("charge", task_id="t2", idempotency_key="k")))
    assert response.task_id == "t2"
    assert (await replicas.backend.get([idempotency_key("k")]))[idempotency_key("k")].data.startswith(b"t2\n")
    [again] = await submit(replicas.b, lone(task("charge", idempotency_key="k")))
    assert again.task_id == "t2"
