"""The HTTP/JSON API against a real server (gRPC and HTTP in one process, memory engines) and an
in-process worker: every endpoint, auth failures (401/403), CSRF, bad input (400 with a JSON
error body), live event streams, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from starlette.routing import Route

from conveyor import Client, Worker, chord, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Security, Settings, Token
from conveyor_server.http.openapi import OPERATIONS
from conveyor_server.http.routes import ROUTES
from tests.support.processes import free_port
from tests.support.wait import wait_for

SECRETS = {"admin": "a-secret", "viewer": "v-secret", "client": "c-secret", "worker": "w-secret"}
Json = dict[str, Any]


def token(role: str) -> Token:
    return Token(f"{role}-token", role, hashlib.sha256(SECRETS[role].encode()).hexdigest())


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[role]}"}


@dataclass
class Api:
    url: str
    address: str
    server: ConveyorServer
    admin: httpx.AsyncClient
    viewer: httpx.AsyncClient
    release: asyncio.Event


async def start_server(security: Security, backend_url: str = "memory://") -> ConveyorServer:
    for _ in range(3):  # another process may take the free port first
        settings = Settings(port=0, broker_url="memory://", backend_url=backend_url, http_port=free_port(),
                            security=security, http_trace_url="http://traces.example/trace/{trace_id}")
        server = ConveyorServer(settings)
        try:
            await server.start()
            return server
        except OSError:
            await server.core.stop()
    raise AssertionError("no free port for the HTTP server")


def worker_for(address: str, release: asyncio.Event, queue: str = "default") -> Worker:
    # One queue per worker: a worker of several queues starves all but its first here (its
    # first queue's fetch keeps the whole window reserved; see the report of issue 18).
    worker = Worker(address, queues=[queue], concurrency=4, token=SECRETS["admin"])

    @worker.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @worker.task("total")
    def total(values: list[int]) -> int:
        return sum(values)

    @worker.task("boom")
    def boom() -> None:
        raise ValueError("boom on purpose")

    @worker.task("hold")
    async def hold() -> str:
        await release.wait()
        return "released"

    return worker


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    server = await start_server(Security(tokens=(token("admin"), token("viewer"), token("client"))))
    url = f"http://127.0.0.1:{server.http_port}"
    address = f"127.0.0.1:{server.port}"
    release = asyncio.Event()
    workers = [worker_for(address, release, queue) for queue in ("default", "work")]
    running = [asyncio.create_task(worker.run()) for worker in workers]
    admin = httpx.AsyncClient(base_url=url, headers=bearer("admin"), timeout=10)
    viewer = httpx.AsyncClient(base_url=url, headers=bearer("viewer"), timeout=10)
    try:
        yield Api(url, address, server, admin, viewer, release)
    finally:
        release.set()
        await admin.aclose()
        await viewer.aclose()
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
        await server.stop()


def error_of(response: httpx.Response, status: int) -> Json:
    """The JSON error body of a refusal with `status`."""
    assert response.status_code == status, response.text
    body: Json = response.json()["error"]
    assert body["status"] == status and body["code"] and body["message"]
    return body


async def submit(api: Api, name: str, *args: Any, queue: str = "default") -> str:
    response = await api.admin.post("/api/v1/tasks", json={"name": name, "args": list(args), "queue": queue})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["task_id"]
    return task_id


async def state_of(api: Api, task_id: str, wanted: str) -> Json:
    async def reached() -> Json:
        detail: Json = (await api.viewer.get(f"/api/v1/tasks/{task_id}")).json()
        return detail if detail.get("state") == wanted else {}

    return await wait_for(reached, 20, f"task {task_id} {wanted}")


# -- auth ----------------------------------------------------------------------------------------

async def test_reads_need_a_viewer_or_admin_token_and_changes_an_admin_one(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        error_of(await anonymous.get("/api/v1/queues"), 401)
        error_of(await anonymous.get("/api/v1/queues", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(await anonymous.get("/api/v1/queues", headers={"Authorization": "Basic x"}), 401)
        assert "role 'client'" in error_of(await anonymous.get("/api/v1/queues", headers=bearer("client")), 403)[
            "message"]
        error_of(await anonymous.get("/api/v1/events/queues"), 401)
        assert (await anonymous.get("/api/v1/openapi.json")).status_code == 200
        session = (await anonymous.get("/api/v1/session")).json()
        assert session["identity"] is None and session["auth"] is True
    assert (await api.viewer.get("/api/v1/queues")).status_code == 200
    refused = error_of(await api.viewer.post("/api/v1/queues/default/pause"), 403)
    assert "viewer" in refused["message"]
    error_of(await api.viewer.post("/api/v1/tasks", json={"name": "add"}), 403)
    assert (await api.admin.post("/api/v1/queues/default/pause")).json() == {"queue": "default", "paused": True}
    assert (await api.admin.post("/api/v1/queues/default/resume")).json()["paused"] is False


async def test_a_browser_logs_in_with_a_cookie_and_needs_the_csrf_token(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as browser:
        error_of(await browser.post("/api/v1/session", content=b"token=x"), 400)  # a form post
        error_of(await browser.post("/api/v1/session", json={"token": "wrong"}), 401)
        error_of(await browser.post("/api/v1/session", json={"token": SECRETS["client"]}), 403)
        error_of(await browser.post("/api/v1/session", json={}), 400)
        login = await browser.post("/api/v1/session", json={"token": SECRETS["admin"]})
        assert login.json() == {"name": "admin-token", "role": "admin", "auth": True}
        cookie = next(c for c in login.headers.get_list("set-cookie") if c.startswith("conveyor_token="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        csrf = browser.cookies["conveyor_csrf"]
        assert (await browser.get("/api/v1/session")).json()["identity"] == {"name": "admin-token", "role": "admin"}
        assert (await browser.get("/api/v1/queues")).status_code == 200
        # A change from the browser without the CSRF header (what a forged cross-site request
        # looks like) is refused; with it, it goes through.
        forged = await browser.post("/api/v1/queues/default/pause", headers={"Origin": "http://evil.example"})
        assert "CSRF" in error_of(forged, 403)["message"]
        wrong = await browser.post("/api/v1/queues/default/pause", headers={"X-CSRF-Token": "guess"})
        error_of(wrong, 403)
        done = await browser.post("/api/v1/queues/default/pause", headers={"X-CSRF-Token": csrf})
        assert done.json()["paused"] is True
        await browser.post("/api/v1/queues/default/resume", headers={"X-CSRF-Token": csrf})
        # Logging in and out are changes too: a forged login would sign the victim in as the
        # attacker, a forged logout would end the session.
        forged_login = await browser.post("/api/v1/session", json={"token": SECRETS["viewer"]},
                                          headers={"Origin": "http://evil.example"})
        assert "CSRF" in error_of(forged_login, 403)["message"]
        assert "CSRF" in error_of(await browser.delete("/api/v1/session"), 403)["message"]
        assert (await browser.get("/api/v1/session")).json()["identity"] == {"name": "admin-token", "role": "admin"}
        assert (await browser.delete("/api/v1/session", headers={"X-CSRF-Token": csrf})).status_code == 204
        error_of(await browser.get("/api/v1/queues"), 401)


async def test_without_tokens_loopback_needs_a_loopback_host_name() -> None:
    server = await start_server(Security())
    try:
        url = f"http://127.0.0.1:{server.http_port}"
        async with httpx.AsyncClient(base_url=url) as local:
            assert (await local.get("/api/v1/queues")).status_code == 200
            assert (await local.post("/api/v1/queues/q/pause")).status_code == 200  # curl: no CSRF needed
            rebound = await local.get("/api/v1/queues", headers={"Host": f"evil.example:{server.http_port}"})
            assert "answers only to" in error_of(rebound, 403)["message"]
            from_page = await local.post("/api/v1/queues/q/resume", headers={"Origin": "http://evil.example"})
            error_of(from_page, 403)
    finally:
        await server.stop()


async def test_grpc_viewer_tokens_read_but_do_not_change(api: Api) -> None:
    channel = grpc.aio.insecure_channel(api.address)
    stub = admin_service_pb2_grpc.AdminServiceStub(channel)
    metadata = (("authorization", f"Bearer {SECRETS['viewer']}"),)
    try:
        await stub.ListQueues(admin_service_pb2.ListQueuesRequest(), metadata=metadata)
        await stub.ListTasks(admin_service_pb2.ListTasksRequest(), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PauseQueue(admin_service_pb2.PauseQueueRequest(queue="q"), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "viewer" in (refused.value.details() or "")
    finally:
        await channel.close()


# -- resources -----------------------------------------------------------------------------------

async def test_queues_fill_pause_and_purge(api: Api) -> None:
    await api.admin.post("/api/v1/queues/idle/pause")
    ids = [await submit(api, "add", i, 1, queue="idle") for i in range(3)]
    queues = {q["name"]: q for q in (await api.viewer.get("/api/v1/queues")).json()["queues"]}
    assert queues["idle"]["ready"] == 3 and queues["idle"]["paused"] is True
    purged = await api.admin.post("/api/v1/queues/idle/purge")
    assert purged.json() == {"queue": "idle", "purged": 3}
    for task_id in ids:
        assert (await state_of(api, task_id, "CANCELLED"))["error"]["type"] == "Purged"
    error_of(await api.admin.post("/api/v1/queues/bad%20name/pause"), 400)


async def test_workers_are_listed_with_their_slots_and_tasks(api: Api) -> None:
    async def listed() -> list[Json]:
        workers: list[Json] = (await api.viewer.get("/api/v1/workers")).json()["workers"]
        return workers

    async def both() -> list[Json]:
        found = await listed()
        return found if len(found) == 2 else []

    workers = await wait_for(both, 20, "the workers connected")
    worker = next(w for w in workers if w["queues"] == ["work"])
    assert worker["language"] == "python" and worker["slots"] >= 4 and worker["slots_used"] == 0
    assert {"add", "boom", "hold", "total"} <= set(worker["tasks"])
    assert worker["connected_at"] and worker["last_heartbeat_at"]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_failed_task_shows_its_traceback_and_can_be_retried(api: Api) -> None:
    traced = {"name": "boom", "headers": {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}}
    task_id = (await api.admin.post("/api/v1/tasks", json=traced)).json()["task_id"]
    detail = await state_of(api, task_id, "FAILURE")
    assert detail["error"]["type"] == "ValueError" and "boom on purpose" in detail["error"]["traceback"]
    assert [h["state"] for h in detail["history"]][-1] == "FAILURE"
    assert detail["call"]["name"] == "boom" and detail["lease"]["held"] is False
    assert detail["trace_id"] == TRACE_ID and detail["trace_url"] == f"http://traces.example/trace/{TRACE_ID}"
    retried = await api.admin.post(f"/api/v1/tasks/{task_id}/retry")
    assert retried.status_code == 201 and retried.json()["retry_of"] == task_id
    await state_of(api, retried.json()["task_id"], "FAILURE")
    unfinished = await submit(api, "hold")
    assert "not ended" in error_of(await api.admin.post(f"/api/v1/tasks/{unfinished}/retry"), 400)["message"]


async def test_tasks_are_searched_and_paged(api: Api) -> None:
    ids = [await submit(api, "add", i, i, queue="work") for i in range(5)]
    for task_id in ids:
        await state_of(api, task_id, "SUCCESS")
    seen: list[str] = []
    token = ""

    async def page_lists() -> bool:
        listed = await api.viewer.get("/api/v1/tasks", params={"queue": "work", "state": "SUCCESS"})
        return len(listed.json()["tasks"]) == 5

    await wait_for(page_lists, 10, "the index caught up")
    while True:
        page = (await api.viewer.get("/api/v1/tasks", params={"queue": "work", "page_size": 2,
                                                              "page_token": token})).json()
        seen += [t["id"] for t in page["tasks"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == list(reversed(ids))
    oldest = (await api.viewer.get("/api/v1/tasks", params={"queue": "work", "order": "oldest"})).json()
    assert [t["id"] for t in oldest["tasks"]] == ids
    by_prefix = (await api.viewer.get("/api/v1/tasks", params={"id": ids[2][:13]})).json()
    assert [t["id"] for t in by_prefix["tasks"]] == [ids[2]]
    none_yet = await api.viewer.get("/api/v1/tasks", params={"queue": "work", "until": "2000-01-01T00:00:00Z"})
    assert none_yet.json()["tasks"] == []


async def test_a_running_task_is_cancelled(api: Api) -> None:
    task_id = await submit(api, "hold")
    await state_of(api, task_id, "STARTED")
    cancelled = await api.admin.post(f"/api/v1/tasks/{task_id}/cancel")
    assert cancelled.json() == {"cancelled_task_ids": [task_id]}
    await state_of(api, task_id, "CANCELLED")


async def test_a_chord_is_a_graph(api: Api) -> None:
    async with Client(api.address, token=SECRETS["admin"]) as client:
        submitted = await client.submit(chord([sig("add", 1, 1), sig("add", 2, 2)], sig("total")))
        assert await client.result(submitted.task_id, wait=20) == 6
    graph = (await api.viewer.get(f"/api/v1/workflows/{submitted.workflow_id}")).json()
    root = graph["root"]
    assert root["kind"] == "chord" and root["state"] == "SUCCESS"
    tasks = [node["task"] for node in _nodes(root) if node["task"]]
    assert sorted(t["name"] for t in tasks) == ["add", "add", "total"]
    assert all(t["state"] == "SUCCESS" for t in tasks)
    error_of(await api.viewer.get("/api/v1/workflows/wf-nothing"), 404)


def _nodes(node: Json) -> list[Json]:
    return [node, *(n for child in node["children"] for n in _nodes(child))]


async def test_dead_letters_are_listed_replayed_and_deleted(api: Api) -> None:
    first, second = await submit(api, "boom", queue="work"), await submit(api, "boom", queue="work")
    for task_id in (first, second):
        await state_of(api, task_id, "FAILURE")
    listed = (await api.viewer.get("/api/v1/dead-letters", params={"queue": "work"})).json()["tasks"]
    assert {t["id"] for t in listed} >= {first, second}
    # A page at a time: the first page's token leads to the rest, and the last page has none.
    one = (await api.viewer.get("/api/v1/dead-letters", params={"queue": "work", "limit": 1})).json()
    rest = (await api.viewer.get("/api/v1/dead-letters", params={"queue": "work", "limit": 1000,
                                                                  "page_token": one["next_page_token"]})).json()
    assert [t["id"] for t in one["tasks"] + rest["tasks"]] == [t["id"] for t in listed] and not rest["next_page_token"]
    error_of(await api.viewer.get("/api/v1/dead-letters", params={"page_token": "?"}), 400)
    replayed = (await api.admin.post("/api/v1/dead-letters/replay", json={"task_ids": [first]})).json()
    assert len(replayed["task_ids"]) == 1
    assert (await api.admin.delete(f"/api/v1/dead-letters/{second}")).status_code == 204
    left = {t["id"] for t in (await api.viewer.get("/api/v1/dead-letters")).json()["tasks"]}
    assert first not in left and second not in left
    error_of(await api.admin.post("/api/v1/dead-letters/replay", json={"task_ids": "x"}), 400)


async def test_schedules_are_created_run_and_deleted(api: Api) -> None:
    body = {"name": "nightly", "cron": "0 3 * * *", "task": {"name": "add", "args": [2, 3]}}
    created = await api.admin.post("/api/v1/schedules", json=body)
    assert created.status_code == 201 and len(created.json()["next_runs"]) == 5
    assert created.json()["next_runs"][0].endswith("T03:00:00.000Z")
    listed = (await api.viewer.get("/api/v1/schedules")).json()["schedules"]
    assert [s["name"] for s in listed] == ["nightly"] and listed[0]["task"]["args"] == [2, 3]
    ran = await api.admin.post("/api/v1/schedules/nightly/run")
    assert (await state_of(api, ran.json()["task_id"], "SUCCESS"))["result"] == 5
    assert (await api.admin.delete("/api/v1/schedules/nightly")).status_code == 204
    error_of(await api.admin.post("/api/v1/schedules/nightly/run"), 404)
    error_of(await api.admin.post("/api/v1/schedules", json={**body, "cron": "not cron"}), 400)


async def test_rate_limits_and_the_task_registry(api: Api) -> None:
    stored = await api.admin.put("/api/v1/limits/add", json={"rate": "10/s", "burst": 5})
    assert stored.json() == {"name": "add", "rate": "10/s", "burst": 5, "per_key": False, "source": "admin"}
    assert (await api.viewer.get("/api/v1/limits")).json()["limits"][0]["name"] == "add"
    assert (await api.admin.delete("/api/v1/limits/add")).status_code == 204
    error_of(await api.admin.delete("/api/v1/limits/add"), 404)
    error_of(await api.admin.put("/api/v1/limits/add", json={"rate": "fast"}), 400)

    async def registered() -> set[str]:
        return {t["name"] for t in (await api.viewer.get("/api/v1/registered-tasks")).json()["tasks"]}

    assert await wait_for(registered, 20, "the worker's tasks registered")


async def test_the_overview_and_its_history(api: Api) -> None:
    await state_of(api, await submit(api, "boom"), "FAILURE")

    async def failure_listed() -> Json:
        overview: Json = (await api.viewer.get("/api/v1/overview")).json()
        return overview if overview["recent_failures"]["tasks"] else {}

    overview = await wait_for(failure_listed, 10, "the failure in the overview")
    assert overview["recent_failures"]["tasks"][0]["name"] == "boom"
    history = (await api.viewer.get("/api/v1/metrics/history")).json()
    assert history["interval"] > 0 and {"at", "succeeded", "failed", "ready", "oldest"} <= set(history["samples"][0])


async def test_bad_input_is_a_400_with_a_json_error(api: Api) -> None:
    cases = [
        api.viewer.get("/api/v1/tasks", params={"page_size": 0}),
        api.viewer.get("/api/v1/tasks", params={"page_size": "many"}),
        api.viewer.get("/api/v1/tasks", params={"page_token": "garbage!"}),
        api.viewer.get("/api/v1/tasks", params={"since": "yesterday"}),
        api.viewer.get("/api/v1/tasks", params={"order": "random"}),
        api.admin.post("/api/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"}),
        api.admin.post("/api/v1/tasks", json=[1, 2]),
        api.admin.post("/api/v1/tasks", json={"args": [1]}),
        api.admin.post("/api/v1/tasks", json={"name": "add", "args": "1, 2"}),
        api.admin.post("/api/v1/tasks", json={"name": "add", "priority": "high"}),
        api.admin.post("/api/v1/tasks", json={"workflow": {"chain": 3}}),
        api.viewer.get("/api/v1/dead-letters", params={"limit": -1}),
    ]
    for response in await asyncio.gather(*cases):
        error_of(response, 400)
    error_of(await api.viewer.get("/api/v1/tasks/no-such-task"), 404)
    error_of(await api.admin.post("/api/v1/tasks/no-such-task/cancel"), 404)
    error_of(await api.viewer.get("/api/v1/no-such-thing"), 404)
    error_of(await api.viewer.delete("/api/v1/queues"), 405)


async def test_a_backend_that_cannot_list_says_so(memcached_backend_url: str) -> None:
    server = await start_server(Security(), memcached_backend_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as local:
            refused = error_of(await local.get("/api/v1/tasks"), 501)
            assert refused["code"] == "UNIMPLEMENTED" and "memcached" in refused["message"]
            session = (await local.get("/api/v1/session")).json()
            assert session["listing"]["enabled"] is False and "memcached" in session["listing"]["reason"]
            assert (await local.get("/api/v1/overview")).json()["recent_failures"]["tasks"] is None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ListTasks(admin_service_pb2.ListTasksRequest())
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
    finally:
        await server.stop()


# -- live ----------------------------------------------------------------------------------------

async def events(client: httpx.AsyncClient, path: str, wanted: int) -> list[tuple[str, Json]]:
    """The first `wanted` events of a stream."""
    found: list[tuple[str, Json]] = []
    async with client.stream("GET", path) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((event, json.loads(line.removeprefix("data: "))))
                if len(found) == wanted:
                    return found
    return found


async def test_a_task_streams_its_state_changes(api: Api) -> None:
    task_id = await submit(api, "hold")
    stream = asyncio.create_task(_until_state(api, task_id, "SUCCESS"))
    await state_of(api, task_id, "STARTED")
    api.release.set()
    states = await asyncio.wait_for(stream, 20)
    assert states[-1] == "SUCCESS" and "STARTED" in states


async def _until_state(api: Api, task_id: str, wanted: str) -> list[str]:
    states: list[str] = []
    async with api.viewer.stream("GET", f"/api/v1/events/tasks/{task_id}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                states.append(json.loads(line.removeprefix("data: "))["state"])
                if states[-1] == wanted:
                    return states
    return states


async def test_queue_and_worker_tables_stream(api: Api) -> None:
    (first,) = await events(api.viewer, "/api/v1/events/queues", 1)
    assert first[0] == "queues" and "queues" in first[1]
    (workers,) = await events(api.viewer, "/api/v1/events/workers", 1)
    assert workers[0] == "workers"
    error_of(await api.viewer.get("/api/v1/events/tasks/no-such-task"), 404)


# -- the document --------------------------------------------------------------------------------

async def test_every_route_is_in_the_openapi_document(api: Api) -> None:
    document = (await api.viewer.get("/api/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    served = {(method.lower(), route.path) for route in ROUTES if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}
    served.add(("get", "/api/v1/openapi.json"))
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert served == documented
    assert set(document["paths"]) == {path for _, path in documented}


async def test_the_server_stops_while_a_page_follows_a_stream() -> None:
    server = await start_server(Security())
    local = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10)
    try:
        async with local.stream("GET", "/api/v1/events/queues") as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            begun = asyncio.get_running_loop().time()
            await server.stop()
            assert asyncio.get_running_loop().time() - begun < 5, "an open stream held the shutdown"
            async with asyncio.timeout(5):
                async for _ in lines:  # the stream ends with the server
                    pass
    finally:
        await local.aclose()
