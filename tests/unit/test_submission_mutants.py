"""Submitting: the edges mutation testing found unpinned (workflow steps filled like lone tasks,
errors that name the bad request, a publish retried in the background and stopped at close,
what a refused submission leaves behind).

On the shared memory engines of tests/unit/replicas.py; background retries run for real with
their first delay set to zero, and are waited for with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest

from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.core import confirmed, submission
from conveyor_server.core.clock import Clock
from conveyor_server.core.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unavailable
from conveyor_server.core.outbox import OUTBOX_GROUP, PUBLISH
from conveyor_server.core.submission import Submitter
from tests.support.loop_time import loop_clock, loop_now
from tests.support.processes import until
from tests.unit.replicas import Replicas, quick_repairs, replicas, short_lived
from tests.unit.test_durability import chain, lone, submit, task
from tests.unit.test_workflow_engine import flow, group_of, step

__all__ = ["quick_repairs", "replicas", "short_lived"]  # fixtures used by the tests below
WF = workflow_pb2
# Long enough for a background retry that should not happen to have happened.
SETTLE_SECONDS = 0.1


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed publish is retried at once (0.1 s in production), and a repair may take over a
    claim at once (the claimer is this same submission)."""
    monkeypatch.setattr(submission, "RETRY_FIRST_SECONDS", 0.0)
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports as unhandled during the test (it should be nothing)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    loop.set_exception_handler(previous)


def retries() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").endswith("_publish_later")]


# -- what is stored ------------------------------------------------------------------------------

async def test_workflow_steps_get_the_default_queue_and_the_callers_trace(replicas: Replicas) -> None:
    steps = [WF.Workflow(task=task_pb2.Signature(name="noop", id=i)) for i in ("a", "b")]
    await replicas.a.submitter.submit(
        [task_service_pb2.SubmitRequest(workflow=WF.Workflow(chain=WF.Chain(steps=steps)))],
        {"traceparent": "caller"},
    )
    for task_id in ("a", "b"):
        record = await replicas.a.store.get(task_id)
        assert record is not None
        assert record.result.queue == "default"
        assert dict(record.result.signature.headers) == {"traceparent": "caller"}


async def test_a_bad_task_is_named_by_its_place_in_the_batch(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match=r"^requests\[1\]\.task: name is empty"):
        await submit(replicas.a, lone(task()), lone(task(name="")))
    with pytest.raises(InvalidArgument, match=r"^request\.task: name is empty"):
        await submit(replicas.a, lone(task(name="")))


async def test_the_hook_given_at_construction_hears_of_every_accepted_lone_task(replicas: Replicas) -> None:
    heard: list[str] = []
    core = replicas.a
    submitter = Submitter(
        core.settings, core.store, core.submitter.publisher, core.submitter.workflow, core.outbox,
        lambda records: heard.extend(r.result.task_id for r in records),
    )
    await submitter.submit([lone(task(task_id="t1")), lone(task(task_id="t2"))])
    assert heard == ["t1", "t2"]


# -- publishing, and retrying a failed publish ----------------------------------------------------

@pytest.mark.looptime  # the settling sleep takes no real time; a retry, with no delay here, runs within it
async def test_a_published_submission_is_not_published_again(
    replicas: Replicas, loop_errors: list[dict[str, Any]]
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await asyncio.sleep(SETTLE_SECONDS)  # a retry, were one started, would have run by now
    assert replicas.broker.published["t1"] == 1
    assert not retries()
    assert loop_errors == []


async def test_a_workflow_whose_first_publish_failed_is_started_by_the_retry(
    replicas: Replicas, loop_errors: list[dict[str, Any]]
) -> None:
    replicas.broker.fail_publishes = 1
    await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    assert replicas.broker.published["a"] == 0
    await until(lambda: replicas.broker.published["a"] == 1, 10.0, "the retry published the first step")
    await until(lambda: not retries(), 10.0, "the retry ended")
    await replicas.a.outbox.drain()
    assert await replicas.backend.members(OUTBOX_GROUP) == {}
    assert replicas.broker.published["b"] == 0
    assert loop_errors == [], "a finished retry leaves nothing behind to report"


@pytest.mark.looptime
async def test_a_failed_publish_is_retried_at_most_half_a_second_apart(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry's cap bounds how long after the broker's return an accepted submission goes out."""
    monkeypatch.setattr(submission, "RETRY_FIRST_SECONDS", 0.1)  # the production backoff, not instant
    attempts: list[float] = []
    published = asyncio.Event()
    publish = replicas.broker.publish

    async def timed(*args: Any) -> None:
        attempts.append(loop_now())
        await publish(*args)
        published.set()

    monkeypatch.setattr(replicas.broker, "publish", timed)
    replicas.broker.fail_publishes = 8
    await submit(replicas.a, lone(task(task_id="t1")))
    # Waited for on the loop's clock: polling would take a loop turn every few fake milliseconds.
    await asyncio.wait_for(published.wait(), 600.0)
    assert replicas.broker.published["t1"] == 1, "the retry published it"
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert len(gaps) == 8
    assert max(gaps) < submission.RETRY_MAX_SECONDS + 0.15 < 0.7, f"a retry waited {max(gaps):.2f} s"


@pytest.mark.looptime
async def test_the_retry_of_a_failed_publish_gives_up_at_the_grace_and_leaves_it_to_the_reconciler(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the outbox grace the reconciler (on any replica) owns the promise: a retry going on here
    would publish the same tasks beside it."""
    monkeypatch.setattr(submission, "RETRY_FIRST_SECONDS", 0.1)
    submitter = replicas.a.submitter
    monkeypatch.setattr(submitter, "settings", dataclasses.replace(submitter.settings, outbox_grace_seconds=1.0))
    monkeypatch.setattr(submitter, "clock", loop_clock())  # its grace runs on the loop's fake time
    replicas.broker.fail_publishes = 1_000_000
    started = loop_now()
    await submit(replicas.a, lone(task(task_id="t1")))
    assert retries(), "a retry runs during the grace"
    await asyncio.wait(retries(), timeout=5.0)  # on the loop's clock
    assert not retries(), "the retry gave up"
    assert loop_now() - started < 1.0 + 0.3, "at the grace, not later"
    assert replicas.broker.published["t1"] == 0
    assert [entry for entry, _ in await replicas.a.outbox.entries(0.0, time.time() + 1)], "the promise is kept"


async def test_a_failed_publish_is_promised_in_the_outbox_as_a_publish_of_its_tasks(replicas: Replicas) -> None:
    replicas.broker.fail_publishes = 1_000
    await submit(replicas.a, lone(task(task_id="t1")), chain(task(task_id="a"), task(task_id="b")))
    [(_, entry)] = await replicas.a.outbox.entries(0.0, time.time() + 1)
    assert entry.kind == PUBLISH
    assert list(entry.task_ids) == ["t1"] and len(entry.workflow_ids) == 1
    await replicas.a.submitter.close()


@pytest.mark.looptime  # the settling sleep takes no real time; a retry left running, with no delay here, runs within it
async def test_close_returns_once_every_retry_has_stopped(replicas: Replicas) -> None:
    replicas.broker.fail_publishes = 1_000
    await submit(replicas.a, lone(task(task_id="t1")))
    assert retries()
    await replicas.a.submitter.close()
    assert all(t.done() for t in retries())
    published = replicas.broker.fail_publishes
    await asyncio.sleep(SETTLE_SECONDS)
    assert replicas.broker.fail_publishes == published, "no publish is tried after close"


# -- a refused submission ------------------------------------------------------------------------

async def test_the_tasks_of_a_refused_submission_end_cancelled_saying_why(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="x")))
    with pytest.raises(AlreadyExists):
        await submit(replicas.b, lone(task(task_id="y")), lone(task(task_id="x")))
    record = await replicas.a.store.get("y")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
    why = result_pb2.TaskError(type="AlreadyExists", message="refused with its submission: task ids already exist: x")
    assert record.result.error == why
    assert record.result.history[-1].state == result_pb2.TASK_STATE_CANCELLED and record.result.history[-1].error == why


class Gate(asyncio.Event):
    """An event that also tells when someone began waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.reached.set()
        return await super().wait()


async def test_a_task_of_a_refused_submission_cancelled_meanwhile_is_not_written_again(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="x")))
    inserted = Gate()
    replicas.backend.hold_after_insert("task:y", inserted)
    refused = asyncio.create_task(submit(replicas.b, lone(task(task_id="y")), lone(task(task_id="x"))))
    await inserted.reached.wait()  # y is stored; the refusal waits at the gate
    await replicas.a.canceller.cancel("y")  # before the refusal gets to it
    cancelled = (await replicas.a.store.load(["y"]))["y"].version
    inserted.set()
    with pytest.raises(AlreadyExists):
        await refused
    assert (await replicas.a.store.load(["y"]))["y"].version == cancelled


async def test_the_plan_of_a_refused_workflow_expires(
    short_lived: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(short_lived.a, lone(task(task_id="x")))
    monkeypatch.setattr(submission, "new_workflow_id", lambda: "wf-refused")
    with pytest.raises(AlreadyExists):
        await submit(short_lived.a, chain(task(task_id="y"), task(task_id="x")))
    assert await short_lived.b.store.plan("wf-refused") is None


async def test_a_streamed_submission_may_hold_up_to_max_stream_tasks_and_a_plain_one_up_to_max_workflow_tasks(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitter = replicas.a.submitter
    limits = dataclasses.replace(submitter.settings.limits, max_workflow_tasks=3, max_stream_tasks=5)
    monkeypatch.setattr(submitter, "settings", dataclasses.replace(submitter.settings, limits=limits))

    def group(size: int, tag: str) -> task_service_pb2.SubmitRequest:
        return flow(group_of(*(step(f"{tag}{i}") for i in range(size))))

    with pytest.raises(InvalidArgument, match="4 tasks, over the limit of 3"):
        await submitter.submit([group(4, "plain")])
    await submitter.submit([group(5, "streamed")], streamed=True)  # planned and written off the loop
    for i in range(5):
        assert await replicas.a.store.get(f"streamed{i}") is not None
    assert replicas.broker.published["streamed0"] == 1
    with pytest.raises(InvalidArgument, match="6 tasks, over the limit of 5"):
        await submitter.submit([group(6, "over")], streamed=True)


# -- a key whose holder is still being stored ----------------------------------------------------

WALL = 1_700_000_000.0  # the submitter's wall clock: keys are taken at times around it


def on_loop_time() -> Clock:
    """The submitter's clock: the wall stands at WALL; its monotonic clock is the loop's fake
    time since the call, rounded to looptime's microsecond ticks so that sums of round delays
    are exact."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    return Clock(wall=lambda: WALL, monotonic=lambda: round(loop.time() - start, 6))


async def take_key(replicas: Replicas, key: str, holder: str, at: float) -> None:
    """The key as a submission leaves it before storing its task `holder` (taken at `at`)."""
    assert not await replicas.backend.insert({f"idem:{key}": f"{holder}\n{at:.3f}".encode()})


def keyed(task_id: str, key: str, queue: str = "default") -> task_service_pb2.SubmitRequest:
    return lone(task_pb2.Signature(name="charge", id=task_id, queue=queue, idempotency_key=key))


@pytest.mark.looptime
async def test_a_key_taken_moments_ago_is_waited_for_with_doubling_delays_then_retry_is_asked(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Round delays (0.25 then 0.5) reach the deadline (0.75) exactly: a wait that would end
    # right at it is still made.
    monkeypatch.setattr(submission, "KEY_WAIT_FIRST_SECONDS", 0.25)
    monkeypatch.setattr(submission, "KEY_WAIT_SECONDS", 0.75)
    submitter = replicas.a.submitter
    monkeypatch.setattr(submitter, "clock", on_loop_time())
    await take_key(replicas, "order:42", "ghost", WALL - 1.0)  # within the outbox grace: maybe still storing
    looks: list[float] = []
    load = replicas.a.store.load

    async def timed(ids: list[str]) -> Any:
        if "ghost" in ids:
            looks.append(submitter.clock.monotonic())
            assert len(looks) < 20, "the wait never ends"
        return await load(ids)

    monkeypatch.setattr(replicas.a.store, "load", timed)
    with pytest.raises(Unavailable) as refused:
        await submitter.submit([keyed("t2", "order:42")])
    assert str(refused.value) == "a submission with key 'order:42' is being stored right now; retry"
    assert looks == [0.0, 0.25, 0.75]
    assert await replicas.a.store.get("t2") is None


@pytest.mark.looptime
async def test_a_key_taken_exactly_the_outbox_grace_ago_by_a_task_never_stored_is_taken_over(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitter = replicas.a.submitter
    monkeypatch.setattr(submitter, "clock", on_loop_time())
    await take_key(replicas, "order:42", "ghost", WALL - submitter.settings.outbox_grace_seconds)
    [response] = await submitter.submit([keyed("t2", "order:42")])
    assert response.task_id == "t2"
    assert await replicas.a.store.get("t2") is not None


async def test_a_refusal_for_a_key_held_on_another_queue_names_the_whole_key(replicas: Replicas) -> None:
    await submit(replicas.a, keyed("t1", "order:42"))
    with pytest.raises(PermissionDenied) as refused:
        await replicas.b.submitter.submit([keyed("t2", "order:42", queue="payroll")], queues=["payroll"])
    assert "the idempotency key 'order:42' is held by a task on another queue" in str(refused.value)


# -- sharing the event loop -----------------------------------------------------------------------

async def test_a_large_batch_is_prepared_in_slices_with_the_loop_serving_others_between(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SubmitBatch of 1,000 held the event loop while every request was checked and planned,
    and the workers' windows ran dry meanwhile: other coroutines run between slices."""
    submitter = replicas.a.submitter
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    seen: list[int] = []  # the other coroutine's turns when each request was prepared
    prepare = submitter._prepare

    def counting(*args: Any) -> Any:
        seen.append(turns)
        return prepare(*args)

    monkeypatch.setattr(submitter, "_prepare", counting)
    slice_ = submission.PREPARE_SLICE
    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        await submitter.submit([lone(task(task_id=f"t{n}")) for n in range(2 * slice_ + 1)])
    finally:
        other.cancel()
    assert len(seen) == 2 * slice_ + 1
    # Within a slice nothing else ran; between two slices the other coroutine did.
    assert len(set(seen[:slice_])) == 1 and len(set(seen[slice_:2 * slice_])) == 1
    assert seen[0] < seen[slice_] < seen[2 * slice_]
    assert await replicas.a.store.get(f"t{2 * slice_}") is not None
