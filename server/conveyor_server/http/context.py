"""What every route needs (the core, access rules, live feeds), and the wrapper that checks
access and turns exceptions into JSON errors for each endpoint."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from .access import Access
from .errors import response_for

if TYPE_CHECKING:
    from ..app import Core
    from .live import Live
    from .sampler import Sampler

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Dashboard:
    core: Core
    access: Access
    sampler: Sampler
    live: Live
    # A task's trace id links here ({trace_id} replaced); empty: no link.
    trace_url: str = ""
    # Set when the server stops: live streams end, so the HTTP server can close at once.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


def dashboard(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


def endpoint(needs: str) -> Callable[[Handler], Handler]:
    """An API route that needs `needs` (access.READ or access.CHANGE); its exceptions become
    JSON errors."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                request.state.identity = dashboard(request).access.authorize(request, needs)
                return await handler(request)
            except Exception as exc:
                return response_for(exc, handler.__qualname__)

        return run

    return wrap
