"""Sweeps over every route the HTTP API serves, against one real server with tokens: who may call
each route (401 without credentials, 403 for a role that may not), and what each route taking a
JSON body says to a body that is not JSON or has the wrong shape (400 with a JSON error naming
the problem). The routes come from the app and the bodies' shapes from the OpenAPI document, so
a new route is swept without a new test."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from starlette.routing import Mount, Route

from conveyor_server.config import Security
from conveyor_server.http.app import build_app
from conveyor_server.http.context import Dashboard
from conveyor_server.http.openapi import document
from tests.http.test_api import SECRETS, Json, bearer, error_of, start_server, token

ON_SERVER = pytest.mark.asyncio(loop_scope="module")
CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
# What the access sweep leaves out, and why ("*": every method under a mount).
EXCLUDED = {
    ("GET", "/"): "the page: fixed HTML with no data, loaded before anyone has logged in",
    ("*", "/static"): "the page's scripts and styles: fixed public assets",
    ("GET", "/api/v1/openapi.json"): "the API's description: a fixed document, public by design",
    ("GET", "/api/v1/session"): "who is logged in: answers callers without credentials too (identity null)",
    ("POST", "/api/v1/session"): "log in: the token comes in the body, not as a credential",
    ("DELETE", "/api/v1/session"): "log out: forgets a cookie, which needs no credential",
}


def served() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, HEAD aside (Starlette adds it to each GET)."""
    app = build_app(cast(Dashboard, None))  # the routes do not depend on the dashboard
    found: list[tuple[str, str]] = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("*", route.path))
        else:
            assert isinstance(route, Route), f"the sweep does not know {route!r}"
            found += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


SERVED = served()
SWEPT = [operation for operation in SERVED if operation not in EXCLUDED]


def concrete(path: str) -> str:
    """The path with a dummy value for each of its parameters."""
    return re.sub(r"\{\w+\}", "dummy", path)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url() -> AsyncIterator[str]:
    roles = ("admin", "viewer", "client", "worker")
    server = await start_server(Security(tokens=tuple(token(role) for role in roles)))
    try:
        yield f"http://127.0.0.1:{server.http_port}"
    finally:
        await server.stop()


async def call(url: str, method: str, path: str, role: str = "", **sent: Any) -> httpx.Response:
    """The answer to one request (a client of its own: no cookies carried over); an event
    stream's body is left unread, since it does not end."""
    headers = bearer(role) if role else {}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client,
        client.stream(method, path, **sent) as response,
    ):
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
        return response


# -- access --------------------------------------------------------------------------------------

def test_the_access_sweep_leaves_out_only_the_public_routes() -> None:
    assert set(EXCLUDED) <= set(SERVED), "an exclusion names a route the app no longer serves"
    public = {(method.upper(), path) for path, operations in document()["paths"].items()
              for method, operation in operations.items() if operation.get("security") == []}
    assert {operation for operation in EXCLUDED if operation[1].startswith("/api/")} == public


@ON_SERVER
@pytest.mark.parametrize(("method", "path"), SWEPT, ids=[f"{method} {path}" for method, path in SWEPT])
async def test_every_route_refuses_callers_without_the_role_it_needs(url: str, method: str, path: str) -> None:
    path = concrete(path)
    anonymous = error_of(await call(url, method, path), 401)
    assert anonymous["code"] == "UNAUTHENTICATED" and "Bearer" in anonymous["message"]
    for role in ("client", "worker"):
        refused = error_of(await call(url, method, path, role), 403)
        assert refused["code"] == "PERMISSION_DENIED" and f"role {role!r}" in refused["message"]
    viewer = await call(url, method, path, "viewer")
    if method in CHANGING:
        assert "may only read" in error_of(viewer, 403)["message"]
    else:
        assert viewer.status_code not in (401, 403), f"a viewer may read {path}: got {viewer.status_code}"
    admin = await call(url, method, path, "admin")
    assert admin.status_code not in (401, 403), f"an admin may call {method} {path}: got {admin.status_code}"


# -- bad input -----------------------------------------------------------------------------------

def _schema(schema: Json) -> Json:
    """The schema, its $ref followed."""
    if "$ref" not in schema:
        return schema
    found: Json = document()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return found


BODIES: dict[tuple[str, str], Json] = {
    (method.upper(), path): _schema(operation["requestBody"]["content"]["application/json"]["schema"])
    for path, operations in document()["paths"].items() for method, operation in operations.items()
    if "requestBody" in operation
}
# A good body for each route that takes one; each wrong one below differs from it in one way.
GOOD: dict[tuple[str, str], Json] = {
    ("POST", "/api/v1/session"): {"token": SECRETS["admin"]},
    ("POST", "/api/v1/tasks"): {"name": "add", "args": [1, 2]},
    ("POST", "/api/v1/dead-letters/replay"): {"task_ids": [], "queue": "q"},
    ("POST", "/api/v1/schedules"): {"name": "nightly", "cron": "0 3 * * *", "task": {"name": "add"}},
    ("PUT", "/api/v1/limits/{name}"): {"rate": "10/s", "burst": 5, "per_key": False},
}
JSON_TYPE = {"content-type": "application/json"}
# Bodies that are not a JSON object, and what the refusal must say.
NOT_JSON: list[tuple[dict[str, Any], str]] = [
    ({"content": b"name=add", "headers": {"content-type": "application/x-www-form-urlencoded"}}, "as JSON"),
    ({"content": b"{not json", "headers": JSON_TYPE}, "not valid JSON"),
    ({"content": b"", "headers": JSON_TYPE}, "not valid JSON"),
    ({"json": [1, 2]}, "must be a JSON object"),
    ({"json": "add"}, "must be a JSON object"),
]
# A value of another JSON type than the one a field's schema gives (an enum is of strings).
WRONG_TYPE: dict[str, object] = {"string": 12345, "integer": "many", "number": "soon", "boolean": "yes",
                                 "array": "x", "object": "x"}


def wrong_value(schema: Json) -> object:
    kind = "object" if "$ref" in schema else schema.get("type", "string")
    assert kind in WRONG_TYPE, f"no wrong value for a field of type {kind!r}"
    return WRONG_TYPE[kind]


@ON_SERVER
@pytest.mark.parametrize(("method", "path"), sorted(BODIES), ids=[f"{m} {p}" for m, p in sorted(BODIES)])
async def test_every_json_body_that_is_not_json_or_has_the_wrong_shape_is_a_400(
    url: str, method: str, path: str,
) -> None:
    assert (method, path) in GOOD, f"{method} {path} takes a JSON body: give a good one in GOOD"
    good, schema = GOOD[(method, path)], BODIES[(method, path)]
    path = concrete(path)
    accepted = await call(url, method, path, "admin", json=good)
    assert accepted.status_code < 400, accepted.text  # so each refusal below is the change's doing
    for sent, problem in NOT_JSON:
        refused = error_of(await call(url, method, path, "admin", **sent), 400)
        assert refused["code"] == "INVALID_ARGUMENT" and problem in refused["message"], (sent, refused)
    # Each field of the wrong type, and each required field left out: the refusal names it.
    wrong_shapes = [(name, {**good, name: wrong_value(field)}) for name, field in schema["properties"].items()]
    wrong_shapes += [(name, {k: v for k, v in good.items() if k != name}) for name in schema.get("required", ())]
    for name, wrong in wrong_shapes:
        refused = error_of(await call(url, method, path, "admin", json=wrong), 400)
        assert refused["code"] == "INVALID_ARGUMENT" and name in refused["message"], (wrong, refused)
