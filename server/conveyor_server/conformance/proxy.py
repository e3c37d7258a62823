"""The TCP proxy between the worker under test and the kit's server, so scenarios can fail the
link: silence it (bytes are dropped both ways, the connections stay open), cut it (every
connection aborted) and refuse new connections until restored."""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 65536


class LinkProxy:
    """Listens on a free loopback port and forwards each connection to 127.0.0.1:target_port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.silent = False
        self.refusing = False
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def silence(self) -> None:
        """Drop every byte from now on, both ways, keeping the connections open: to both ends
        the other side went quiet."""
        self.silent = True

    def cut(self, refuse: bool = False) -> None:
        """Abort every connection; with `refuse`, close new ones at once until restore()."""
        self.refusing = refuse
        self.silent = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.refusing = False
        self.silent = False

    async def close(self) -> None:
        self.cut(refuse=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()  # the server is down: the worker sees a failed connection
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for end in (writer, up_writer):
            end.transport.abort()
            self._writers.discard(end)
        for pump in pumps:
            pump.cancel()
            self._tasks.discard(pump)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(CHUNK):
                if self.silent:
                    continue
                writer.write(chunk)
                await writer.drain()
