"""Who may call the HTTP API, and protection against requests a browser was tricked into.

- The same tokens as gRPC (`security.tokens`, api/auth.py): `Authorization: Bearer <token>`
  (curl, scripts), or the token a person logged in with, kept in an HttpOnly, SameSite=Strict
  cookie. Reads need the `viewer` or `admin` role, changes the `admin` role; `client` and
  `worker` tokens are refused. With no tokens configured (loopback only) everyone is admin.
- CSRF: a change that may come from a browser (it carries a cookie, an Origin or a
  Sec-Fetch-Site header) must echo the `conveyor_csrf` cookie in an `X-CSRF-Token` header
  (double submit: another site can neither read the cookie nor send the header without a CORS
  preflight, which this server never grants). A change sent with a bearer token needs none,
  since nothing sends that header on its own. Request bodies must be JSON, which a form cannot
  send.
- DNS rebinding: on a loopback address, requests must name a loopback host (`Host` header),
  so a page from a hostile name that resolves to 127.0.0.1 cannot use a server without tokens.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response

from ..api.auth import Authenticator, AuthError, Identity
from .errors import ApiError

TOKEN_COOKIE = "conveyor_token"
CSRF_COOKIE = "conveyor_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A login lasts this long (the cookie's Max-Age); the token itself is checked on every request.
SESSION_SECONDS = 12 * 3600
ANONYMOUS = Identity("anonymous", "admin")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
READ, CHANGE = "read", "change"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Access:
    authenticator: Authenticator
    # Cookies marked Secure (the server speaks TLS).
    secure: bool = False
    # Host names requests may carry (empty: any), for servers on a loopback address.
    allowed_hosts: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.authenticator.enabled

    def check_host(self, request: Request) -> None:
        if not self.allowed_hosts:
            return
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.lower() not in self.allowed_hosts:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"this server answers only to {sorted(self.allowed_hosts)} (Host was {host!r})")

    def identify(self, request: Request) -> tuple[Identity, bool]:
        """The caller, and whether a bearer header (not a cookie) said so."""
        header = request.headers.get("authorization")
        if not self.enabled:
            return ANONYMOUS, header is not None
        secret = request.cookies.get(TOKEN_COOKIE)
        if header is None and not secret:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "log in with an admin or viewer token (POST /api/v1/session), "
                           "or send 'Authorization: Bearer <token>'")
        try:
            identity = self.authenticator.identify([("authorization", header or f"Bearer {secret}")])
        except AuthError as exc:
            raise ApiError(exc.code, str(exc)) from None
        assert identity is not None
        return identity, header is not None

    def authorize(self, request: Request, needs: str) -> Identity:
        self.check_host(request)
        identity, by_header = self.identify(request)
        if identity.role not in ("admin", "viewer"):
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"token {identity.name!r} has role {identity.role!r}; the HTTP API needs an admin or "
                           "viewer token")
        if needs == CHANGE and identity.role != "admin":
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"token {identity.name!r} has role 'viewer', which may only read; this needs an admin token")
        if request.method not in SAFE_METHODS and not by_header:
            check_csrf(request)
        return identity


def from_browser(request: Request) -> bool:
    return any(name in request.headers for name in ("cookie", "origin", "sec-fetch-site"))


def check_csrf(request: Request) -> None:
    if not from_browser(request):
        return  # curl and scripts: no ambient credentials to abuse
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.headers.get(CSRF_HEADER, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                       f"missing or wrong CSRF token: send the {CSRF_COOKIE} cookie's value in the X-CSRF-Token "
                       "header (or use 'Authorization: Bearer <token>')")


def set_csrf_cookie(request: Request, response: Response, secure: bool) -> None:
    """Give the browser a CSRF token, once (the pages' scripts echo it on every change)."""
    if not request.cookies.get(CSRF_COOKIE):
        response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(32), path="/", samesite="strict", secure=secure)


def set_session_cookie(response: Response, token: str, secure: bool) -> None:
    response.set_cookie(TOKEN_COOKIE, token, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict",
                        secure=secure)


def clear_session_cookie(response: Response, secure: bool) -> None:
    response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict", secure=secure)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else (a form post cannot get here)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "send the body as JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the body must be a JSON object")
    return body
