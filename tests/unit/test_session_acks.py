"""A worker session's ResultAcks linger a moment so that the acks of results recorded close
together share one message (core/sessions.py, ACK_LINGER_SECONDS)."""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import worker_service_pb2
from conveyor_server.core.sessions import ACK_LINGER_SECONDS, WorkerSession

ACCEPTED = worker_service_pb2.ACK_STATUS_ACCEPTED


def session() -> WorkerSession:
    return WorkerSession("w1", worker_service_pb2.Hello(), ["q"], 4, Timestamp(), last_seen=0.0)


def ack(task_id: str) -> worker_service_pb2.ResultAck:
    return worker_service_pb2.ResultAck(task_id=task_id, lease_token=f"token-{task_id}", status=ACCEPTED)


def sent(worker: WorkerSession) -> list[worker_service_pb2.ConnectResponse | None]:
    messages = []
    while not worker.outbox.empty():
        messages.append(worker.outbox.get_nowait())
    return messages


async def test_acks_recorded_within_the_linger_go_out_together_once_it_ends() -> None:
    worker = session()
    worker.ack([ack("a")])
    await asyncio.sleep(ACK_LINGER_SECONDS / 4)
    worker.ack([ack("b"), ack("c")])
    assert sent(worker) == []  # still lingering: nothing written yet
    await asyncio.sleep(ACK_LINGER_SECONDS * 3)
    messages = sent(worker)
    assert len(messages) == 1
    assert messages[0] is not None
    assert [a.task_id for a in messages[0].acks.acks] == ["a", "b", "c"]


async def test_acks_after_a_message_went_out_wait_for_a_linger_of_their_own() -> None:
    worker = session()
    worker.ack([ack("a")])
    await asyncio.sleep(ACK_LINGER_SECONDS * 3)
    worker.ack([ack("b")])
    await asyncio.sleep(ACK_LINGER_SECONDS * 3)
    messages = sent(worker)
    assert [[a.task_id for a in m.acks.acks] for m in messages if m is not None] == [["a"], ["b"]]


async def test_the_end_of_the_stream_sends_the_lingering_acks_first() -> None:
    worker = session()
    worker.ack([ack("a")])
    worker.end_outbox()
    messages = sent(worker)
    assert len(messages) == 2 and messages[1] is None
    assert messages[0] is not None and [a.task_id for a in messages[0].acks.acks] == ["a"]
    await asyncio.sleep(ACK_LINGER_SECONDS * 3)
    assert sent(worker) == []  # the timer was cancelled: nothing after the end


async def test_no_acks_no_message() -> None:
    worker = session()
    worker.ack([])
    await asyncio.sleep(ACK_LINGER_SECONDS * 3)
    assert sent(worker) == []
