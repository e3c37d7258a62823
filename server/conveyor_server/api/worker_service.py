"""WorkerService: one bidirectional stream per worker, adapted onto WorkerConnections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc

from ..core.connection import WorkerConnections
from ..core.errors import CoreError
from ..core.sizing import DEFAULT_WORKER_RECEIVE_BYTES, ENVELOPE_BYTES
from .auth import Authenticator
from .status import Refusal, abort, refuse

Context = grpc.aio.ServicerContext[Any, Any]
# Coalesce up to this many ready server messages of one kind into one write.
MAX_COALESCE = 64


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(self, connections: WorkerConnections, authenticator: Authenticator | None = None) -> None:
        self.connections = connections
        self.authenticator = authenticator or Authenticator(())

    async def Connect(
        self, request_iterator: AsyncIterator[worker_service_pb2.ConnectRequest], context: Context
    ) -> AsyncIterator[worker_service_pb2.ConnectResponse]:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "hello":
            await refuse(context, Refusal(
                grpc.StatusCode.FAILED_PRECONDITION, "the first message on the stream must be hello",
                reason="HELLO_REQUIRED",
            ))
        identity = self.authenticator.identify(context.invocation_metadata())
        queues = list(first.hello.queues) or [self.connections.settings.default_queue]
        if identity is not None and not identity.may_serve(queues):
            await refuse(context, Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {identity.name!r} may serve queues {list(identity.queues)}, not {queues}",
                reason="QUEUE_NOT_PERMITTED", metadata={"token": identity.name, "queue": ",".join(queues)},
            ))
        try:
            # A worker's replacements may use only the queues its token is limited to.
            allowed = identity.queues if identity is not None and identity.role != "admin" else ()
            session = self.connections.open(first.hello, allowed)
        except CoreError as exc:
            await abort(context, exc, "WorkerService.Connect")
        reader = asyncio.create_task(self.connections.run(session, requests))
        # When the worker closes its side, what is still owed (acks) goes out, then the stream ends.
        reader.add_done_callback(lambda _: session.end_outbox())
        try:
            ended = False
            while not ended:
                ready = await session.outbox.get()
                if ready is None:
                    break
                merged, ended = _coalesce(ready, session.outbox, session.hello.max_receive_bytes)
                for message in merged:
                    yield message
        finally:
            reader.cancel()
            # The reader's own error (if any) is examined below, not raised from here.
            await asyncio.gather(reader, return_exceptions=True)
        if reader.done() and not reader.cancelled() and (failure := reader.exception()) is not None:
            if isinstance(failure, Exception) and not isinstance(failure, grpc.RpcError):
                # A refusal, an engine out of reach (UNAVAILABLE), or a bug (logged once).
                await abort(context, failure, "WorkerService.Connect")
            raise failure


def _coalesce(
    first: worker_service_pb2.ConnectResponse,
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse | None],
    max_receive_bytes: int,
) -> tuple[list[worker_service_pb2.ConnectResponse], bool]:
    """Merge queued assignments and acks into as few messages as possible (batching is
    what makes the stream fast: one write per message dominates the cost), never making an
    assignments message larger than the worker can receive. Also says whether the end of the
    stream was reached."""
    budget = (max_receive_bytes or DEFAULT_WORKER_RECEIVE_BYTES) - ENVELOPE_BYTES
    merged = [first]
    assigned = first.ByteSize() if first.WhichOneof("message") == "assignments" else 0
    for _ in range(MAX_COALESCE):
        if outbox.empty():
            break
        message = outbox.get_nowait()
        if message is None:
            return merged, True
        last = merged[-1]
        kind = message.WhichOneof("message")
        if kind == "assignments":
            size = message.ByteSize()
            if last.WhichOneof("message") == "assignments" and assigned + size <= budget:
                last.assignments.items.extend(message.assignments.items)
                assigned += size
            else:
                merged.append(message)
                assigned = size
        elif kind == last.WhichOneof("message") and kind == "acks":
            last.acks.acks.extend(message.acks.acks)
        else:
            merged.append(message)
    return merged, False
