"""Logging in and out of the dashboard, and what the pages need to know about the server."""

from __future__ import annotations

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...api.auth import AuthError
from ..access import ANONYMOUS, check_csrf, clear_session_cookie, json_body, set_csrf_cookie, set_session_cookie
from ..context import dashboard
from ..errors import ApiError, response_for
from .params import bad


async def login(request: Request) -> Response:
    """POST {"token": "..."}: check the token (admin or viewer) and keep it in an HttpOnly cookie.
    From a browser it needs the CSRF token like any change: a forged login would sign the victim
    in as the attacker (the page gets the token from GET /api/v1/session first)."""
    dash = dashboard(request)
    access = dash.access
    try:
        access.check_host(request)
        check_csrf(request)
        body = await json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            raise bad("send {\"token\": \"<an admin or viewer token>\"}")
        if not access.enabled:
            response: Response = JSONResponse({"name": ANONYMOUS.name, "role": ANONYMOUS.role, "auth": False})
        else:
            identity = access.authenticator.identify([("authorization", f"Bearer {token.strip()}")])
            assert identity is not None
            if identity.role not in ("admin", "viewer"):
                raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                               f"token {identity.name!r} has role {identity.role!r}; log in with an admin or viewer "
                               "token")
            response = JSONResponse({"name": identity.name, "role": identity.role, "auth": True})
            set_session_cookie(response, token.strip(), access.secure)
    except AuthError as exc:
        return response_for(ApiError(exc.code, str(exc)), "login")
    except Exception as exc:
        return response_for(exc, "login")
    set_csrf_cookie(request, response, access.secure)
    return response


async def logout(request: Request) -> Response:
    """DELETE: forget the login cookie; a change like any other, so it needs the CSRF token."""
    access = dashboard(request).access
    try:
        access.check_host(request)
        check_csrf(request)
    except Exception as exc:
        return response_for(exc, "logout")
    response = Response(status_code=204)
    clear_session_cookie(response, access.secure)
    return response


async def whoami(request: Request) -> Response:
    """Who the caller is (null when not logged in) and what this server can show."""
    dash = dashboard(request)
    identity = None
    try:
        dash.access.check_host(request)
        found, _ = dash.access.identify(request)
        identity = {"name": found.name, "role": found.role}
    except ApiError as exc:
        if exc.code != grpc.StatusCode.UNAUTHENTICATED:
            return response_for(exc, "whoami")
    indexer = dash.core.admin.indexer
    response = JSONResponse({
        "identity": identity,
        "auth": dash.access.enabled,
        "server_id": dash.core.settings.server_id,
        "listing": {"enabled": indexer.enabled, "reason": "" if indexer.enabled else indexer.unsupported},
        "trace_url": dash.trace_url,
        "sample_seconds": dash.sampler.interval,
    })
    set_csrf_cookie(request, response, dash.access.secure)
    return response


ROUTES = [
    Route("/api/v1/session", login, methods=["POST"]),
    Route("/api/v1/session", logout, methods=["DELETE"]),
    Route("/api/v1/session", whoami, methods=["GET"]),
]
