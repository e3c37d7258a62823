"""A client token scoped to queues submits only to those, and a submit that repeats a task (its
idempotency key or unique key is held) never answers with a task on another queue: the scope is
checked before any answer, and a holder outside it is refused without its id."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import task_pb2, task_service_pb2
from conveyor_server.app import Core
from conveyor_server.core.errors import PermissionDenied
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below

PAYROLL = ("payroll",)


async def submit_as(
    core: Core, queues: tuple[str, ...], *requests: task_service_pb2.SubmitRequest
) -> list[task_service_pb2.SubmitResponse]:
    """Submit as a client token limited to `queues`."""
    return await core.submitter.submit(list(requests), queues=queues)


def on(queue: str, signature: task_pb2.Signature) -> task_service_pb2.SubmitRequest:
    signature.queue = queue
    return lone(signature)


def keyed(task_id: str, key: str) -> task_pb2.Signature:
    return task("charge", task_id=task_id, idempotency_key=key)


def unique(task_id: str, key: str) -> task_pb2.Signature:
    return task("sync", task_id=task_id, unique_for=Duration(seconds=60), unique_key=key)


async def refused(core: Core, *requests: task_service_pb2.SubmitRequest) -> str:
    with pytest.raises(PermissionDenied) as denied:
        await submit_as(core, PAYROLL, *requests)
    return str(denied.value)


async def test_a_scoped_resubmission_of_an_idempotency_key_held_on_another_queue_is_refused(
    replicas: Replicas,
) -> None:
    [first] = await submit(replicas.a, on("default", keyed("t1", "order-42")))
    message = await refused(replicas.b, on("default", keyed("t2", "order-42")))
    assert "may submit only to queues ['payroll']" in message and "['default']" in message
    assert first.task_id not in message


async def test_an_idempotency_key_reused_on_an_allowed_queue_does_not_reveal_its_task_on_another(
    replicas: Replicas,
) -> None:
    [first] = await submit(replicas.a, on("default", keyed("t1", "order-42")))
    message = await refused(replicas.b, on("payroll", keyed("t2", "order-42")))
    assert "the idempotency key 'order-42' is held by a task on another queue" in message
    assert first.task_id not in message and "default" not in message
    assert await replicas.a.store.get("t2") is None, "nothing was submitted"
    # One of several in a batch refuses the batch: no answer for the others either.
    await refused(replicas.b, on("payroll", keyed("t3", "other")), on("payroll", keyed("t4", "order-42")))
    assert await replicas.a.store.get("t3") is None


async def test_a_scoped_resubmission_of_a_unique_key_held_on_another_queue_is_refused(replicas: Replicas) -> None:
    [first] = await submit(replicas.a, on("default", unique("t1", "nightly")))
    assert first.task_id not in await refused(replicas.b, on("default", unique("t2", "nightly")))
    message = await refused(replicas.b, on("payroll", unique("t3", "nightly")))
    assert "the unique key 'nightly' is held by a task on another queue" in message
    assert first.task_id not in message
    assert await replicas.a.store.get("t3") is None, "nothing was submitted"


async def test_a_scoped_token_repeating_a_task_of_its_own_queue_gets_that_task(replicas: Replicas) -> None:
    [first] = await submit_as(replicas.a, PAYROLL, on("payroll", keyed("t1", "order-42")))
    [again] = await submit_as(replicas.b, PAYROLL, on("payroll", keyed("t2", "order-42")))
    assert again.task_id == first.task_id == "t1"
    [live] = await submit_as(replicas.a, PAYROLL, on("payroll", unique("u1", "nightly")))
    [joined] = await submit_as(replicas.b, PAYROLL, on("payroll", unique("u2", "nightly")))
    assert joined.task_id == live.task_id == "u1"


async def test_a_submission_refused_for_its_queue_takes_no_key(replicas: Replicas) -> None:
    await refused(replicas.a, on("default", keyed("t1", "order-42")))
    # The key is still free: the next submitter gets its own task at once (not "being stored; retry").
    [response] = await submit(replicas.b, on("default", keyed("t2", "order-42")))
    assert response.task_id == "t2"
