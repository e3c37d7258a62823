"""Reading a streamed submission (core/streamed.py) part by part, with no server: what is sealed,
and each refusal with the request field it names (the BadRequest a client gets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.config import Limits
from conveyor_server.core import streamed
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.streamed import receive

Part = task_service_pb2.SubmitStreamRequest


def member(n: int) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(task=task_pb2.Signature(name="double", id=f"m-{n}"))


def opened_group() -> Part:
    return Part(open=task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(group=workflow_pb2.Group())))


def opened_chord() -> Part:
    chord = workflow_pb2.Chord(header=workflow_pb2.Group(), callback=workflow_pb2.Workflow(
        task=task_pb2.Signature(name="total", id="cb")))
    return Part(open=task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(chord=chord)))


def piece(numbers: Iterable[int]) -> Part:
    return Part(members=task_service_pb2.SubmitStreamMembers(members=[member(n) for n in numbers]))


def sealed(count: int) -> Part:
    return Part(commit=task_service_pb2.SubmitStreamCommit(member_count=count))


async def stream(*parts: Part) -> AsyncIterator[Part]:
    for part in parts:
        yield part


async def refusal(*parts: Part, limits: Limits | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        await receive(stream(*parts), limits or Limits())
    return raised.value


async def test_a_group_is_sealed_with_every_member_in_order() -> None:
    submission = await receive(stream(opened_group(), piece(range(3)), piece(range(3, 5)), sealed(5)), Limits())
    assert [m.task.id for m in submission.request.workflow.group.members] == [f"m-{n}" for n in range(5)]
    assert submission.received == 5


async def test_a_chords_members_go_to_its_header_and_its_callback_counts_as_a_task() -> None:
    submission = await receive(stream(opened_chord(), piece(range(2)), sealed(2)), Limits(max_stream_tasks=3))
    assert [m.task.id for m in submission.request.workflow.chord.header.members] == ["m-0", "m-1"]
    too_many = await refusal(opened_chord(), piece(range(3)), sealed(3), limits=Limits(max_stream_tasks=3))
    assert str(too_many) == "members: the stream holds more than 3 tasks (max_stream_tasks; callbacks count as tasks)"


async def test_a_stream_of_exactly_the_most_tasks_is_taken() -> None:
    submission = await receive(stream(opened_group(), piece(range(4)), sealed(4)), Limits(max_stream_tasks=4))
    assert submission.received == 4


@pytest.mark.parametrize(("parts", "message", "field"), [
    ((piece(range(1)),), "the first message of a stream must be an open", "open"),
    ((sealed(0),), "the first message of a stream must be an open", "open"),
    ((opened_group(), opened_group()), "open: a stream opens once, with its first message", "open"),
    ((opened_group(), Part()), "a stream message must set open, members or commit", "part"),
    ((opened_group(), piece(range(2)), sealed(3)),
     "commit: member_count is 3, but 2 members were received; nothing was submitted", "commit.member_count"),
    ((opened_group(), piece(range(2))), "the stream ended without a commit; nothing was submitted", ""),
    ((Part(open=task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="one"))),),
     "open: a streamed submission's workflow must be a group or a chord (its members are streamed)", "open.workflow"),
])
async def test_a_malformed_stream_is_refused_naming_the_field(
    parts: tuple[Part, ...], message: str, field: str
) -> None:
    refused = await refusal(*parts)
    assert (str(refused), refused.field) == (message, field)


async def test_a_piece_over_the_most_members_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamed, "MAX_PIECE_MEMBERS", 2)
    assert (await receive(stream(opened_group(), piece(range(2)), sealed(2)), Limits())).received == 2
    refused = await refusal(opened_group(), piece(range(3)))
    assert (str(refused), refused.field) == ("members: a piece holds at most 2 members, not 3", "members.members")


async def test_a_silent_client_times_out() -> None:
    async def silent() -> AsyncIterator[Part]:
        yield opened_group()
        await asyncio.sleep(10)
        yield sealed(0)

    with pytest.raises(TimeoutError):
        await receive(silent(), Limits(stream_idle_seconds=0.05))
