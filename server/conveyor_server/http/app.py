"""The Starlette application: the API routes, the OpenAPI document, the pages and their assets,
and security headers on every response."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import set_csrf_cookie
from .context import Dashboard, dashboard
from .errors import http_exception
from .openapi import document
from .routes import ROUTES

STATIC = Path(__file__).parent / "static"
# Pages run only this server's own scripts and styles (vendored, nothing from elsewhere).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (a plain ASGI middleware: it leaves streams alone)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def index(request: Request) -> Response:
    """The single page; its scripts route by the URL's #fragment (#/queues, #/tasks/ID, ...)."""
    response = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
    set_csrf_cookie(request, response, dashboard(request).access.secure)
    return response


async def openapi(request: Request) -> Response:
    return JSONResponse(document())


def build_app(dash: Dashboard) -> Starlette:
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/v1/openapi.json", openapi, methods=["GET"]),
        *ROUTES,
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                    exception_handlers={HTTPException: http_exception})
    app.state.dashboard = dash
    return app
