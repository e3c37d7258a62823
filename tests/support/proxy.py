"""A TCP proxy for fault-injection tests: cut, reset or slow the link between a client and a real server.

The proxy runs its own asyncio loop in a daemon thread, so sync and async tests drive it the same way:
every public method is a plain blocking call that is safe from any thread (never from the proxy's own loop).

    with TcpProxy("127.0.0.1", 6379) as proxy:          # listens on a free loopback port
        url = f"redis://{proxy.address}/0"               # point the client at the proxy
        proxy.cut()                                      # drop every link; new ones are closed at once
        proxy.restore()                                  # accept and forward again
        proxy.reset()                                    # drop current links, keep accepting
        proxy.delay(0.05)                                # add 50 ms before forwarding each chunk

A cut is "the server went away": open connections are aborted and a new connection is accepted and closed at
once (the client sees EOF), so clients notice it immediately rather than waiting for a timeout. The listening
port never changes, so a restored proxy is reached at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType

CHUNK = 65536
CONNECT_SECONDS = 5.0
START_SECONDS = 10.0


class _Link:
    """One proxied connection: the client's transport and the upstream one."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:<free port> to `target_host:target_port`; see the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self._cut = False
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start listening (returns once the port is bound); `port` is then the real port."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy->{self.target_port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_SECONDS):
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"proxy failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        """Close the listener and every link, and end the thread. Idempotent."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stopping.set)
        thread.join(START_SECONDS)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """`host:port` clients should connect to."""
        return f"{self.host}:{self.port}"

    # -- faults ----------------------------------------------------------------------------------------------

    def cut(self) -> None:
        """Abort every open link; until `restore()`, new connections are accepted and closed at once."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Forward new connections again (links cut earlier stay closed: clients reconnect)."""
        self._call(self._do_restore)

    def reset(self) -> None:
        """Abort every open link but keep accepting new ones (a connection reset, not an outage)."""
        self._call(self._abort_all)

    def delay(self, seconds: float) -> None:
        """Wait `seconds` before forwarding each chunk, both directions; 0 removes the latency."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    # -- observation -----------------------------------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def active(self) -> int:
        """Links open right now."""
        return len(self._links)

    @property
    def accepted(self) -> int:
        """Connections accepted since start (including those closed because the proxy was cut)."""
        return self._accepted

    # -- internals -------------------------------------------------------------------------------------------

    def _call(self, action: Callable[[], object]) -> None:
        """Run `action` on the proxy loop and wait for it, so the fault is in place when the call returns."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("proxy is not running")

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), loop).result(START_SECONDS)

    def _do_cut(self) -> None:
        self._cut = True
        self._abort_all()

    def _do_restore(self) -> None:
        self._cut = False

    def _abort_all(self) -> None:
        for link in list(self._links):
            link.abort()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:
            self._error = error
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            self._abort_all()
            await self._server.wait_closed()
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The top of a connection task: cancellation at shutdown ends it quietly (asyncio would log it).
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._cut:
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), CONNECT_SECONDS)
            except (OSError, TimeoutError):
                return
            link.upstream = up_writer
            if self._cut or link not in self._links:  # cut while connecting
                return
            pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                     asyncio.create_task(self._pump(up_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF or an error; the caller then closes both sides."""
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await source.read(CHUNK)
                if not data:
                    return
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                if sink.transport.is_closing():
                    return
                sink.write(data)
                await sink.drain()
