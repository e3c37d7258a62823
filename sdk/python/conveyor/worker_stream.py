"""One WorkerService.Connect stream of a worker: the channel, the queue of messages to send,
heartbeats at the interval the server's Welcome gives, and the server's messages handed on.

The Node worker keeps the same part in workers/node/lib/worker_stream.js.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from conveyor.tls import open_channel
from conveyor.v1 import worker_service_pb2, worker_service_pb2_grpc
from conveyor.values import seconds_of

# Until the Welcome says otherwise; no heartbeat goes out before it.
DEFAULT_HEARTBEAT_SECONDS = 5.0
# A shorter interval from the server is raised to this.
MIN_HEARTBEAT_SECONDS = 0.05


class WorkerStream:
    def __init__(
        self, address: str, credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]] | None, max_receive_bytes: int,
    ) -> None:
        self.address = address
        self._credentials = credentials
        self._metadata = metadata
        self._max_receive_bytes = max_receive_bytes
        self._outgoing: asyncio.Queue[worker_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self._open = False
        self._heartbeat_seconds = DEFAULT_HEARTBEAT_SECONDS
        # Set by the server's Welcome.
        self.welcomed = asyncio.Event()

    async def run(
        self,
        opening: Sequence[worker_service_pb2.ConnectRequest],
        on_message: Callable[[worker_service_pb2.ConnectResponse], None],
    ) -> None:
        """Send `opening` (Hello first), then whatever send() is given, and hand each message
        from the server to `on_message` until the server ends the stream. Raises
        grpc.aio.AioRpcError when the stream breaks."""
        for first in opening:
            self._outgoing.put_nowait(first)
        self._open = True
        channel = open_channel(self.address, self._credentials,
                               [("grpc.max_receive_message_length", self._max_receive_bytes)])
        async with channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            call = stub.Connect(self._requests(), metadata=self._metadata)
            heartbeats = asyncio.create_task(self._heartbeats())
            try:
                async for message in call:
                    if message.WhichOneof("message") == "welcome":
                        self._welcome(message.welcome)
                    on_message(message)
            finally:
                heartbeats.cancel()
                self._open = False
                self._outgoing.put_nowait(None)

    def send(self, message: worker_service_pb2.ConnectRequest) -> None:
        """Queue a message; dropped once the stream has ended."""
        if self._open:
            self._outgoing.put_nowait(message)

    def close(self) -> None:
        """End our side after what is queued; the server then ends its side."""
        if self._open:
            self._outgoing.put_nowait(None)

    def _welcome(self, welcome: worker_service_pb2.Welcome) -> None:
        self._heartbeat_seconds = max(seconds_of(welcome.heartbeat_interval), MIN_HEARTBEAT_SECONDS)
        self.welcomed.set()

    async def _requests(self) -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        while True:
            message = await self._outgoing.get()
            if message is None:
                return
            yield message

    async def _heartbeats(self) -> None:
        # Not before the Welcome: sleeping the default interval first could outlast a short lease.
        await self.welcomed.wait()
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            self.send(worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat()))
