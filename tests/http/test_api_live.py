"""The live pages' event streams (overview samples, the task list's `changed`, a workflow's graph)
and workflows submitted and cancelled through the HTTP API, against the real server and worker
of test_api.py."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx

from conveyor_server.config import Security
from conveyor_server.http.live import Live
from tests.http.test_api import Api, Json, api, error_of, start_server, state_of, submit
from tests.support.processes import eventually

__all__ = ["api"]  # the fixture the tests below use

# A workflow in protobuf JSON: `hold` (until the test releases it), then add(1, 2).
HOLD_THEN_ADD: Json = {"chain": {"steps": [
    {"task": {"name": "hold"}},
    {"task": {"name": "add", "args": [{"intValue": "1"}, {"intValue": "2"}], "immutable": True}},
]}}


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, Json]]:
    """The (event, data) pairs of an event stream."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))


async def follow(client: httpx.AsyncClient, path: str, until: Callable[[Json], bool]) -> list[tuple[str, Json]]:
    """A stream's events up to the first whose data `until` accepts."""
    found: list[tuple[str, Json]] = []
    async with client.stream("GET", path) as response:
        async for event in sse(response):
            found.append(event)
            if until(event[1]):
                break
    return found


def live_of(api: Api) -> Live:
    assert api.server.http is not None
    return api.server.http.live


def tasks_of(graph: Json) -> list[Json]:
    """The graph's tasks, in order."""
    def walk(node: Json) -> list[Json]:
        return [*([node["task"]] if node["task"] else []), *(t for child in node["children"] for t in walk(child))]

    return walk(graph["root"])


async def submit_workflow(api: Api, workflow: Json) -> Json:
    response = await api.admin.post("/api/v1/tasks", json={"workflow": workflow})
    assert response.status_code == 201, response.text
    submitted: Json = response.json()
    assert submitted["workflow_id"].startswith("wf-"), submitted
    return submitted


async def test_the_overview_streams_samples_of_queues_and_workers(api: Api) -> None:
    await api.admin.post("/api/v1/queues/idle/pause")
    for number in range(2):
        await submit(api, "add", number, 1, queue="idle")
    # The latest sample comes at once (the charts have a point to draw), then one per interval.
    found = await asyncio.wait_for(
        follow(api.viewer, "/api/v1/events/overview", lambda sample: sample["ready"].get("idle") == 2), 20)
    assert {event for event, _ in found} == {"sample"}
    first, sample = found[0][1], found[-1][1]
    assert len(found) >= 2 and sample["at"] > first["at"]  # the first was taken before the submissions
    assert sample["workers"] == 2 and sample["in_flight"]["idle"] == 0
    assert sample["submitted"]["idle"] > 0 and sample["oldest"]["idle"] >= 0


async def test_the_task_list_hears_that_a_task_was_submitted(api: Api) -> None:
    hub = live_of(api).tasks
    stream = asyncio.create_task(follow(api.viewer, "/api/v1/events/tasks", lambda data: data["changed"]))
    await eventually(lambda: hub.watched, 10, "the page subscribed")
    before = time.time()
    task_id = await submit(api, "add", 2, 3)
    ((event, data),) = await asyncio.wait_for(stream, 20)
    assert event == "changed" and data["at"] >= before
    # What the page does on `changed`: it loads the list again, which now holds the task.
    listed = (await api.viewer.get("/api/v1/tasks")).json()["tasks"]
    assert task_id in [task["id"] for task in listed]


async def test_a_workflow_submitted_over_http_streams_its_graph_until_its_tasks_succeed(api: Api) -> None:
    submitted = await submit_workflow(api, HOLD_THEN_ADD)
    path = f"/api/v1/events/workflows/{submitted['workflow_id']}"
    graphs: list[Json] = []
    async with asyncio.timeout(20), api.viewer.stream("GET", path) as response:
        async for event, graph in sse(response):
            assert event == "workflow"
            graphs.append(graph)
            if len(graphs) == 1:
                api.release.set()  # hold ends only after the first graph was sent
            if graph["root"]["state"] == "SUCCESS":
                break
    assert "SUCCESS" not in [task["state"] for task in tasks_of(graphs[0])]
    last = tasks_of(graphs[-1])
    assert [(task["name"], task["state"]) for task in last] == [("hold", "SUCCESS"), ("add", "SUCCESS")]
    assert [task["id"] for task in last] == submitted["task_ids"]
    assert (await state_of(api, submitted["task_id"], "SUCCESS"))["result"] == 3
    error_of(await api.viewer.get("/api/v1/events/workflows/wf-nothing"), 404)


async def test_a_workflow_is_cancelled_over_http(api: Api) -> None:
    submitted = await submit_workflow(api, HOLD_THEN_ADD)
    workflow_id = submitted["workflow_id"]
    graph = (await api.viewer.get(f"/api/v1/workflows/{workflow_id}")).json()
    hold, add = submitted["task_ids"]
    assert [task["id"] for task in tasks_of(graph)] == [hold, add]
    await state_of(api, hold, "STARTED")
    cancelled = await api.admin.post(f"/api/v1/tasks/{workflow_id}/cancel")
    assert sorted(cancelled.json()["cancelled_task_ids"]) == sorted([hold, add])
    for task_id in (hold, add):
        assert (await state_of(api, task_id, "CANCELLED"))["error"]["type"] == "Cancelled"
    graph = (await api.viewer.get(f"/api/v1/workflows/{workflow_id}")).json()
    assert graph["root"]["state"] == "CANCELLED"
    again = await api.admin.post(f"/api/v1/tasks/{workflow_id}/cancel")
    assert again.json() == {"cancelled_task_ids": []}


async def test_a_stream_the_page_leaves_leaves_no_task_behind() -> None:
    server = await start_server(Security())
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(str(context["message"])))
    local = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10)
    try:
        assert server.http is not None
        hub = server.http.live.queues
        for _ in range(3):
            await follow(local, "/api/v1/events/queues", lambda _: True)
            await eventually(lambda: not hub.watched, 10, "the server saw the page leave")
        gc.collect()  # a task left pending is reported as it is collected
        assert reported == []
    finally:
        loop.set_exception_handler(previous)
        await local.aclose()
        await server.stop()

