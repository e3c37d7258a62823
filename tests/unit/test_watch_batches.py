"""WatchResults in batches (issue #21: one message per event made a watch over 10,000 tasks cost
the server more than running them): a client that asks for batches gets the events found
together in one response, in the order and with the content one-per-response gives; a client
that does not ask gets one event per response, as before."""

from __future__ import annotations

import grpc

from conveyor import Client, sig
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_server.api.task_service import MAX_WATCH_RESPONSE_BYTES, _watch_responses
from conveyor_server.core.event_spans import EventSpan
from conveyor_server.core.sizing import chunks_within
from tests.unit.test_sdk_client import address

__all__ = ["address"]  # the fixture used by the tests below: a server and a worker with "add"

TASKS = 40


async def finished(address: str) -> tuple[list[str], int]:
    """The ids of TASKS finished tasks, and how many transitions their histories hold."""
    async with Client(address) as client:
        submitted = await client.submit_batch(sig("add", n, 0) for n in range(TASKS))
        ids = [s.task_id for s in submitted]
        results = [await client.get_result(task_id, wait=20) for task_id in ids]
        assert all(r.state == result_pb2.TASK_STATE_SUCCESS for r in results)
        return ids, sum(len(r.history) for r in results)


async def responses(address: str, ids: list[str], per_response: int) -> list[task_service_pb2.WatchResultsResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        request = task_service_pb2.WatchResultsRequest(task_ids=ids, max_events_per_response=per_response)
        return [response async for response in stub.WatchResults(request)]


def flat(answers: list[task_service_pb2.WatchResultsResponse]) -> list[tuple[str, int, int]]:
    """(task, state, value) of every event, in the order received, from either field."""
    events = [event for answer in answers for event in (answer.events or [answer.event])]
    return [(e.task_id, e.state, e.result.result.int_value) for e in events]


async def test_a_batched_watch_sends_the_same_events_in_fewer_messages(address: str) -> None:
    ids, transitions = await finished(address)
    assert transitions >= 3 * TASKS  # at least PENDING, STARTED, SUCCESS each

    single = await responses(address, ids, 0)
    batched = await responses(address, ids, 16)

    assert all(answer.HasField("event") and not answer.events for answer in single)
    assert len(single) == transitions
    assert all(not answer.HasField("event") and 1 <= len(answer.events) <= 16 for answer in batched)
    # Every history was read at once: its events come in full responses of 16, not one by one.
    assert len(batched) == -(-transitions // 16)
    assert flat(batched) == flat(single)
    assert {(task_id, value) for task_id, state, value in flat(batched) if state == result_pb2.TASK_STATE_SUCCESS} == {
        (task_id, n) for n, task_id in enumerate(ids)
    }


async def test_the_sdk_watch_reads_batches_and_gives_every_event_once(address: str) -> None:
    ids, transitions = await finished(address)
    async with Client(address) as client:
        events = [(e.task_id, e.state) async for e in client.watch(ids)]
        history = (await client.get_result(ids[7])).history
    assert len(events) == transitions
    assert [state for task_id, state in events if task_id == ids[7]] == [step.state for step in history]


def event(task_id: str, payload_bytes: int) -> result_pb2.TaskEvent:
    value = task_pb2.Value(bytes_value=b"x" * payload_bytes)
    return result_pb2.TaskEvent(task_id=task_id, result=result_pb2.TaskResult(task_id=task_id, result=value))


def span(task_id: str, payload_bytes: int) -> EventSpan:
    """One SUCCESS transition not sent yet, of a result carrying `payload_bytes`."""
    result = event(task_id, payload_bytes).result
    result.history.add(state=result_pb2.TASK_STATE_SUCCESS)
    return EventSpan(result, 0)


def test_chunks_keep_order_and_stop_at_the_count_or_the_bytes() -> None:
    small = [event(f"s{i}", 10) for i in range(7)]
    assert [[e.task_id for e in chunk] for chunk in chunks_within(small, 3, 1 << 20)] == [
        ["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"],
    ]
    big = [event(f"b{i}", 400) for i in range(5)]
    chunks = chunks_within(big, 100, 1000)
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]  # two 400-byte events fit in 1000, three do not
    assert all(task_service_pb2.WatchResultsResponse(events=chunk).ByteSize() <= 1000 for chunk in chunks)


def test_an_event_larger_than_the_bytes_goes_alone_and_is_not_dropped() -> None:
    items = [event("a", 10), event("huge", 5000), event("b", 10)]
    assert [[e.task_id for e in chunk] for chunk in chunks_within(items, 10, 1000)] == [["a"], ["huge"], ["b"]]
    assert chunks_within([], 10, 1000) == []


def test_a_response_over_the_byte_limit_is_cut_and_keeps_every_event_in_order() -> None:
    # Three events of 400 KiB: together over MAX_WATCH_RESPONSE_BYTES (1 MiB), so the server
    # cuts the response by size; an event alone over the limit still goes, alone.
    spans = [span(f"e{i}", 400 * 1024) for i in range(3)] + [span("huge", 2 * 1024 * 1024), span("last", 10)]
    answers = list(_watch_responses(spans, 512))
    assert [[e.task_id for e in answer.events] for answer in answers] == [["e0", "e1"], ["e2"], ["huge"], ["last"]]
    assert all(answer.ByteSize() <= MAX_WATCH_RESPONSE_BYTES for answer in answers if len(answer.events) > 1)
