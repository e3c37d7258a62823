"""Tasks: the searchable list (through the task index), one task in full, submit, cancel and
retry."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conveyor.v1 import task_pb2, task_service_pb2
from conveyor.values import set_seconds, to_value, to_value_map

from ...backends.task_index import TaskQuery
from ...core.errors import FailedPrecondition, NotFound
from ...core.records import is_terminal
from ...core.task_index import MAX_PAGE_SIZE
from .. import convert
from ..access import CHANGE, READ, json_body
from ..context import dashboard, endpoint
from . import params


def task_query(request: Request) -> TaskQuery:
    order = request.query_params.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise params.bad(f"order must be newest or oldest, got {order!r}")
    return TaskQuery(
        states=params.states(request), queue=request.query_params.get("queue", "").strip(),
        name=request.query_params.get("name", "").strip(), id_prefix=request.query_params.get("id", "").strip(),
        since_us=params.micros(request, "since"), until_us=params.micros(request, "until"),
        limit=params.integer(request, "page_size", 50, 1, MAX_PAGE_SIZE), oldest_first=order == "oldest",
    )


@endpoint(READ)
async def list_tasks(request: Request) -> Response:
    """?state=FAILURE&queue=&name=&id=<prefix>&since=&until=&order=newest|oldest&page_size=&page_token="""
    token = request.query_params.get("page_token", "")
    page = await dashboard(request).core.admin.list_tasks(task_query(request), token)
    return JSONResponse({"tasks": [convert.task(r.result) for r in page.records],
                         "next_page_token": page.next_page_token})


async def task_detail(request: Request, task_id: str) -> dict[str, Any]:
    core = dashboard(request).core
    record = None if task_id.startswith("wf-") else await core.store.get(task_id)
    result = record.result if record is not None else await core.reader.get(task_id)
    return convert.task_detail(result, record, dashboard(request).trace_url)


@endpoint(READ)
async def get_task(request: Request) -> Response:
    return JSONResponse(await task_detail(request, request.path_params["task_id"]))


def signature_from_json(body: dict[str, Any]) -> task_pb2.Signature:
    name = params.field(body, "name", str, "")
    if not name:
        raise params.bad("name (the task's name) is required")
    signature = task_pb2.Signature(
        name=name, queue=params.field(body, "queue", str, ""), priority=params.field(body, "priority", int, 0),
        idempotency_key=params.field(body, "idempotency_key", str, ""),
        args=[to_value(a) for a in params.field(body, "args", list, [])],
        kwargs=to_value_map(params.field(body, "kwargs", dict, {})),
        headers={str(k): str(v) for k, v in params.field(body, "headers", dict, {}).items()},
    )
    countdown = params.field(body, "countdown", (int, float))
    if countdown is not None:
        set_seconds(signature.countdown, countdown)
    return signature


@endpoint(CHANGE)
async def submit(request: Request) -> Response:
    """A task as {"name", "args", "kwargs", "queue", "priority", "countdown", "idempotency_key",
    "headers"} with plain JSON values, or a workflow as {"workflow": <conveyor.v1.Workflow in
    protobuf JSON>}."""
    body = await json_body(request)
    submission = task_service_pb2.SubmitRequest()
    if "workflow" in body:
        try:
            json_format.ParseDict(params.field(body, "workflow", dict), submission.workflow)
        except json_format.ParseError as exc:
            raise params.bad(f"workflow: {exc}") from None
    else:
        submission.task.CopyFrom(signature_from_json(body))
    (response,) = await dashboard(request).core.submitter.submit([submission])
    return JSONResponse({"task_id": response.task_id, "workflow_id": response.workflow_id,
                         "task_ids": list(response.task_ids)}, status_code=201)


@endpoint(CHANGE)
async def cancel(request: Request) -> Response:
    """Cancel a task (a running one gets a Cancel on its worker's stream) or a whole workflow."""
    cancelled = await dashboard(request).core.canceller.cancel(request.path_params["task_id"])
    return JSONResponse({"cancelled_task_ids": cancelled})


@endpoint(CHANGE)
async def retry(request: Request) -> Response:
    """Submit an ended task's call again as a new task (and take it off the dead letters)."""
    core = dashboard(request).core
    task_id = request.path_params["task_id"]
    record = await core.store.get(task_id)
    if record is None:
        raise NotFound(f"no task with id {task_id!r} (unknown, or its result expired)")
    if not is_terminal(record):
        raise FailedPrecondition(f"task {task_id!r} has not ended ({convert.state_name(record.result.state)}); "
                                 "only an ended task can be retried")
    (new_id,) = await core.admin.resubmit([task_id])
    return JSONResponse({"task_id": new_id, "retry_of": task_id}, status_code=201)


@endpoint(READ)
async def get_workflow(request: Request) -> Response:
    response = await dashboard(request).core.reader.workflow(request.path_params["workflow_id"])
    return JSONResponse(convert.workflow(response))


ROUTES = [
    Route("/api/v1/tasks", list_tasks, methods=["GET"]),
    Route("/api/v1/tasks", submit, methods=["POST"]),
    Route("/api/v1/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/api/v1/tasks/{task_id}/cancel", cancel, methods=["POST"]),
    Route("/api/v1/tasks/{task_id}/retry", retry, methods=["POST"]),
    Route("/api/v1/workflows/{workflow_id}", get_workflow, methods=["GET"]),
]
