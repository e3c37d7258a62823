"""Listening for HTTP: uvicorn inside the server's event loop, next to grpc.aio.

uvicorn normally owns the process (signal handlers, its own loop); here it only serves: the
`conveyor serve` process keeps its signal handling, and stopping the gRPC server stops this too.
The socket is bound here first, so a port in use is reported at once with a clear reason, and
port 0 picks a free one (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from ..api.auth import Authenticator
from ..background import stop_tasks
from ..config import Settings
from ..security import is_loopback
from .access import LOOPBACK_HOSTS, Access
from .app import build_app
from .context import Dashboard
from .exposure import check_http_exposure
from .live import Live
from .sampler import Sampler

if TYPE_CHECKING:
    from ..app import Core

log = logging.getLogger(__name__)

# The default port: when it is taken (a second server on this machine) the server runs without
# the dashboard and says so. Any other port that is taken fails the start.
DEFAULT_PORT = 8080
STARTUP_SECONDS = 10.0
# Open requests get this long to finish at shutdown (live streams end at once).
GRACEFUL_SECONDS = 2


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # `conveyor serve` handles SIGINT/SIGTERM and stops this server itself


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class DashboardServer:
    def __init__(self, settings: Settings, core: Core, authenticator: Authenticator) -> None:
        check_http_exposure(settings)
        self.settings = settings
        security = settings.security
        secure = bool(security.tls_cert_file)
        hosts = frozenset() if authenticator.enabled or not is_loopback(settings.http_host) else (
            LOOPBACK_HOSTS | {settings.http_host.lower()}
        )
        self.sampler = Sampler(core)
        self.live = Live(core, rates=self.sampler.latest_submitted)
        self.dashboard = Dashboard(core, Access(authenticator, secure, hosts), self.sampler, self.live,
                                   settings.http_trace_url)
        self._server: _InLoopServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sampling: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.security.tls_cert_file else "http"
        host = self.settings.http_host
        return f"{scheme}://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{self.port}/"

    async def start(self) -> int:
        """Listen; returns the bound port, or 0 when the default port was taken (no dashboard)."""
        settings = self.settings
        try:
            sock = _bind(settings.http_host, settings.http_port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and settings.http_port == DEFAULT_PORT:
                log.warning("the dashboard's default port %s:%d is in use (another server?): running without "
                            "it; set http_port (or --http) to serve it elsewhere", settings.http_host, DEFAULT_PORT)
                return 0
            reason = (exc.strerror or str(exc)).lower()
            where = f"{settings.http_host}:{settings.http_port}"
            raise OSError(f"cannot serve the dashboard on {where}: {reason}") from None
        security = settings.security
        # uvicorn's own lines (started, shutting down) say nothing this server's log does not.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(
            build_app(self.dashboard), log_config=None, access_log=False, lifespan="off", server_header=False,
            date_header=False, timeout_graceful_shutdown=GRACEFUL_SECONDS, proxy_headers=False,
            ssl_certfile=security.tls_cert_file or None, ssl_keyfile=security.tls_key_file or None,
        )
        self._server = _InLoopServer(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(STARTUP_SECONDS):
            while not self._server.started:
                if self._serving.done():
                    self._serving.result()  # raises what stopped it
                    raise OSError(f"the dashboard on {settings.http_host}:{settings.http_port} did not start")
                await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        self.sampler.listeners.append(self.live.sample_taken)
        self.live.attach()
        self._sampling = asyncio.create_task(self.sampler.run())
        log.info("dashboard on %s", self.url)
        return self.port

    async def stop(self) -> None:
        self.dashboard.stopping.set()
        await stop_tasks(self._sampling)
        await self.live.close()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
