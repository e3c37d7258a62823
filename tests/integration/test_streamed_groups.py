"""Generator groups (issue 16): group(generator) and chord(generator, callback) are read only at
submit and streamed to the server in pieces (TaskService.SubmitStream); the server submits the
group only at the commit, so a stream that ends early leaves nothing. Against an in-process
server on the memory engines and an SDK worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from conveyor import Client, Worker, chain, chord, group, sig
from conveyor.canvas import Canvas
from conveyor.client import to_request, with_task_ids
from conveyor.streaming import PIECE_MEMBERS, pieces, streamed_group
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc, workflow_pb2
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Limits, Settings
from conveyor_server.core.planner import compile_workflow


class Server:
    def __init__(self, address: str) -> None:
        self.address = address
        self.gathered: list[list[int]] = []  # each run of the chord callback, with its list


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    limits = Limits(max_stream_tasks=3_000, stream_idle_seconds=1.0)
    conveyor = ConveyorServer(Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://",
                                       limits=limits))
    port = await conveyor.start()
    running = Server(f"127.0.0.1:{port}")
    worker = Worker(running.address, concurrency=8)

    @worker.task("double")
    def double(x: int) -> int:
        return 2 * x

    @worker.task("gather")
    def gather(values: list[int]) -> list[int]:
        running.gathered.append(values)
        return values

    task = asyncio.create_task(worker.run())
    try:
        yield running
    finally:
        worker.stop()
        await task
        await conveyor.stop()


def counted(n: int, read: list[int], fail_at: int = -1) -> Iterator[Canvas]:
    """sig("double", i) for i < n, noting each read; raises at `fail_at` (a producer that breaks)."""
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"the producer broke at member {i}")
        read.append(i)
        yield sig("double", i).set(id=f"member-{i}")


def test_building_a_generator_group_or_chord_reads_nothing() -> None:
    read: list[int] = []
    lazy = group(counted(10, read)).link(sig("gather"))
    chorded = chord(counted(10, read), sig("gather"))
    assert read == [] and lazy.members == () and streamed_group(lazy) is lazy
    assert streamed_group(chorded) is chorded.header


def test_a_list_group_is_one_message_as_before() -> None:
    listed = group([sig("double", 1), sig("double", 2)])
    assert streamed_group(listed) is None
    assert [m.task.args[0].int_value for m in to_request(listed).workflow.group.members] == [1, 2]


def test_a_generator_group_inside_a_chain_is_read_into_the_message() -> None:
    nested = chain(group(sig("double", i) for i in range(3)), sig("gather"))
    assert streamed_group(nested) is None
    assert len(to_request(nested).workflow.chain.steps[0].group.members) == 3


def test_pieces_read_the_generator_one_piece_at_a_time() -> None:
    read: list[int] = []
    stream = pieces(counted(2_500, read), 2, lambda _: None)
    first = next(stream)
    assert len(first.members) == PIECE_MEMBERS and len(read) == PIECE_MEMBERS
    assert [len(p.members) for p in stream] == [1_000, 500] and len(read) == 2_500


async def test_a_generator_group_runs_every_member_in_order(server: Server) -> None:
    async with Client(server.address) as client:
        submitted = await client.submit(group(sig("double", i) for i in range(2_500)))
        assert submitted.workflow_id and submitted.task_ids == ()
        assert await client.result(submitted, wait=60) == [2 * i for i in range(2_500)]


async def test_a_chord_over_a_generator_fires_once_with_every_value_in_order(server: Server) -> None:
    async with Client(server.address) as client:
        submitted = await client.submit(chord((sig("double", i) for i in range(1_500)), sig("gather")))
        assert submitted.task_id  # the callback's
        assert await client.result(submitted, wait=60) == [2 * i for i in range(1_500)]
        await asyncio.sleep(0.3)  # a second run of the callback would show by now
        assert server.gathered == [[2 * i for i in range(1_500)]]


async def test_canvas_options_reach_the_streamed_members(server: Server) -> None:
    async with Client(server.address) as client:
        submitted = await client.submit(group(sig("double") for _ in range(1_001)), args=(21,))
        assert submitted.task_ids == ()  # streamed
        assert await client.result(submitted, wait=30) == [42] * 1_001


async def test_a_generator_of_one_piece_or_less_goes_as_one_submit_with_its_task_ids(server: Server) -> None:
    read: list[int] = []
    async with Client(server.address) as client:
        submitted = await client.submit(chord(counted(PIECE_MEMBERS, read), sig("gather")))
        assert len(submitted.task_ids) == PIECE_MEMBERS + 1 and submitted.task_ids[0] == "member-0"
        assert await client.result(submitted, wait=30) == [2 * i for i in range(PIECE_MEMBERS)]


async def test_a_producer_that_breaks_midway_submits_nothing(server: Server) -> None:
    read: list[int] = []
    async with Client(server.address) as client:
        with pytest.raises(RuntimeError, match="broke at member 1500"):
            await client.submit(group(counted(2_000, read, fail_at=1_500)))
        for member in ("member-0", "member-999", "member-1499"):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.get_result(member)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_cancelled_submit_submits_nothing(server: Server) -> None:
    def members() -> Iterator[Canvas]:
        for i in range(2_000):
            if i == 1_100:  # one piece went out: cancel the submit, as a caller's timeout would
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            yield sig("double", i).set(id=f"member-{i}")

    async with Client(server.address) as client:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(client.submit(group(members())))
        await asyncio.sleep(0.2)  # the server has seen the cancel by now
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.get_result("member-0")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- the protocol, as any client speaks it -----------------------------------------------------


def opening() -> task_service_pb2.SubmitStreamRequest:
    return task_service_pb2.SubmitStreamRequest(
        open=task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(group=workflow_pb2.Group()))
    )


def members(ids: range) -> task_service_pb2.SubmitStreamRequest:
    piece = task_service_pb2.SubmitStreamMembers(
        members=[sig("double", i).set(id=f"raw-{i}").to_workflow() for i in ids]
    )
    return task_service_pb2.SubmitStreamRequest(members=piece)


def commit(count: int) -> task_service_pb2.SubmitStreamRequest:
    return task_service_pb2.SubmitStreamRequest(commit=task_service_pb2.SubmitStreamCommit(member_count=count))


async def refused(address: str, *parts: task_service_pb2.SubmitStreamRequest, end: bool = True) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = task_service_pb2_grpc.TaskServiceStub(channel).SubmitStream()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            for part in parts:
                await call.write(part)
            if end:
                await call.done_writing()
            await call
        return error.value


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((opening(), members(range(3)), commit(4)), "member_count is 4, but 3 members were received"),
        ((opening(), members(range(3))), "ended without a commit"),
        ((members(range(3)), commit(3)), "first message of a stream must be an open"),
        ((opening(), opening()), "a stream opens once"),
        (
            (
                task_service_pb2.SubmitStreamRequest(
                    open=task_service_pb2.SubmitRequest(task=sig("double", 1).to_proto())
                ),
            ),
            "must be a group or a chord",
        ),
        ((opening(), members(range(1_001))), "at most 1000 members, not 1001"),
        (
            (opening(), *(members(range(i, i + 1_000)) for i in range(0, 3_000, 1_000)), members(range(3_000, 3_001))),
            "more than 3000 tasks (max_stream_tasks",
        ),
    ],
)
async def test_a_malformed_stream_is_refused_and_submits_nothing(
    server: Server, parts: tuple[task_service_pb2.SubmitStreamRequest, ...], message: str
) -> None:
    error = await refused(server.address, *parts)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (error.details() or "")
    async with Client(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.get_result("raw-0")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_silent_stream_ends_after_stream_idle_seconds(server: Server) -> None:
    error = await refused(server.address, opening(), members(range(2)), end=False)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_seconds" in (error.details() or "")


async def test_a_bad_member_is_refused_at_the_commit_with_its_place(server: Server) -> None:
    too_urgent = sig("double", 1).set(priority=12).to_workflow()
    bad = task_service_pb2.SubmitStreamRequest(members=task_service_pb2.SubmitStreamMembers(members=[too_urgent]))
    error = await refused(server.address, opening(), members(range(2)), bad, commit(3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "group[2]" in (error.details() or "")


async def test_a_member_nesting_too_deep_is_refused_by_the_sdk(server: Server) -> None:
    deep: Canvas = sig("double", 1)
    for _ in range(31):  # 32 levels: one too many as a member (the group is the first)
        deep = group([deep])
    async with Client(server.address) as client:
        members = [*(sig("double", i) for i in range(PIECE_MEMBERS)), deep]  # streamed: over one piece
        with pytest.raises(ValueError, match=f"member {PIECE_MEMBERS} of the streamed group nests more than 32"):
            await client.submit(group(iter(members)))


def test_a_map_plan_keeps_no_copy_of_its_items() -> None:
    request = with_task_ids(to_request(sig("double").map(range(1_000))))
    plan = compile_workflow(request.workflow, "wf-1", lambda s: s).plan
    assert not plan.HasField("source") and len(plan.SerializeToString()) < 4_000
