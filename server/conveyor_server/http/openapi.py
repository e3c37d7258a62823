"""The OpenAPI 3.1 document of `/api/v1/`, served at /api/v1/openapi.json.

Written out here rather than derived from the handlers: each operation is one row of OPERATIONS
(method, path, summary, who may call it, parameters, body, answer), and tests/http checks that
every route the app serves is documented and every documented route is served.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


def ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: tuple[str, ...] = (), **properties: JSON) -> JSON:
    found: JSON = {"type": "object", "properties": properties}
    if required:
        found["required"] = list(required)
    return found


def array(items: JSON) -> JSON:
    return {"type": "array", "items": items}


STR: JSON = {"type": "string"}
INT: JSON = {"type": "integer"}
NUM: JSON = {"type": "number"}
BOOL: JSON = {"type": "boolean"}
TIME: JSON = {"type": ["string", "null"], "format": "date-time"}
ANY: JSON = {"description": "Any JSON value (bytes as {\"$bytes\": base64})"}
STATE: JSON = {"type": "string", "enum": ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE",
                                           "CANCELLED", "EXPIRED"]}
TASK_ERROR: JSON = {"oneOf": [obj(type=STR, message=STR, traceback=STR), {"type": "null"}]}

SCHEMAS: dict[str, JSON] = {
    "Error": obj(("error",), error=obj(("status", "code", "message"), status=INT, code=STR, message=STR)),
    "Task": obj(("id", "name", "queue", "state"), id=STR, name=STR, queue=STR, state=STATE, attempts=INT,
                worker_id=STR, workflow_id=STR, submitted_at=TIME, started_at=TIME, finished_at=TIME,
                error=TASK_ERROR),
    "Call": obj(id=STR, name=STR, queue=STR, args=array(ANY), kwargs={"type": "object"},
                headers={"type": "object", "additionalProperties": STR}, priority=INT, eta=TIME,
                countdown={"type": ["number", "null"]}, time_limit={"type": ["number", "null"]},
                max_attempts={"type": ["integer", "null"]}, idempotency_key=STR, parent_id=STR),
    "TaskDetail": {"allOf": [ref("Task"), obj(
        call=ref("Call"), result=ANY, progress=ANY, trace_id=STR, trace_url=STR,
        history=array(obj(state=STATE, at=TIME, attempt=INT, worker_id=STR, error=TASK_ERROR)),
        lease={"oneOf": [obj(held=BOOL, deliveries=INT, renewed_at=TIME, retry_at=TIME), {"type": "null"}]},
        attempt_errors=array(TASK_ERROR),
    )]},
    "TaskPage": obj(("tasks", "next_page_token"), tasks=array(ref("Task")), next_page_token=STR),
    "Submit": obj(name=STR, args=array(ANY), kwargs={"type": "object"}, queue=STR, priority=INT, countdown=NUM,
                  idempotency_key=STR, headers={"type": "object", "additionalProperties": STR},
                  workflow={"type": "object", "description": "A conveyor.v1.Workflow in protobuf JSON (instead of "
                                                             "the task fields)"}),
    "Submitted": obj(task_id=STR, workflow_id=STR, task_ids=array(STR)),
    "Queue": obj(name=STR, ready=INT, delayed=INT, in_flight=INT, unroutable=INT, paused=BOOL,
                 submitted_per_second=NUM),
    "Worker": obj(id=STR, language=STR, sdk_version=STR, pid=INT, hostname=STR, queues=array(STR), slots_used=INT,
                  slots=INT, tasks=array(STR), connected_at=TIME, last_heartbeat_at=TIME, draining=BOOL,
                  server_id=STR),
    "WorkflowNode": obj(node_id=STR, kind=STR, state=STATE,
                        task={"oneOf": [obj(id=STR, name=STR, state=STATE), {"type": "null"}]},
                        children=array(ref("WorkflowNode"))),
    "Workflow": obj(workflow_id=STR, result_task_id=STR, root=ref("WorkflowNode")),
    "Schedule": obj(name=STR, cron=STR, task=ref("Call"), missed_ticks={"enum": ["SKIP", "RUN_ONCE"]},
                    next_run_at=TIME, last_run_at=TIME, next_runs=array(STR), paused=BOOL),
    "NewSchedule": obj(("name", "cron", "task"), name=STR, cron=STR, task=ref("Submit"),
                       missed_ticks={"enum": ["SKIP", "RUN_ONCE"]}),
    "RateLimit": obj(name=STR, rate=STR, burst=INT, per_key=BOOL, source={"enum": ["admin", "config"]}),
    "Sample": obj(at=NUM, succeeded=NUM, failed=NUM, workers=INT, ready={"type": "object"},
                  in_flight={"type": "object"}, submitted={"type": "object"}, oldest={"type": "object"}),
    "Session": obj(identity={"oneOf": [obj(name=STR, role=STR), {"type": "null"}]}, auth=BOOL, server_id=STR,
                   listing=obj(enabled=BOOL, reason=STR), trace_url=STR, sample_seconds=NUM),
}

PARAMETERS: dict[str, JSON] = {
    "state": {"in": "query", "schema": STR, "description": "States, comma-separated or repeated (e.g. FAILURE)"},
    "queue": {"in": "query", "schema": STR},
    "name": {"in": "query", "schema": STR, "description": "The task name"},
    "id": {"in": "query", "schema": STR, "description": "A task id prefix"},
    "since": {"in": "query", "schema": STR, "description": "Submitted at or after (RFC 3339 or epoch seconds)"},
    "until": {"in": "query", "schema": STR, "description": "Submitted before (RFC 3339 or epoch seconds)"},
    "order": {"in": "query", "schema": {"enum": ["newest", "oldest"]}},
    "page_size": {"in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    "page_token": {"in": "query", "schema": STR, "description": "next_page_token of the previous page"},
    "limit": {"in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    # "public", "read" (viewer or admin) or "change" (admin).
    access: str
    answer: JSON | None = None
    body: JSON | None = None
    query: tuple[str, ...] = ()
    status: int = 200
    stream: bool = False


OPERATIONS: tuple[Op, ...] = (
    Op("get", "/api/v1/session", "Who is logged in, and what this server can show", "public", ref("Session")),
    Op("post", "/api/v1/session", "Log in: keep an admin or viewer token in an HttpOnly cookie", "public",
       obj(name=STR, role=STR, auth=BOOL), obj(("token",), token=STR)),
    Op("delete", "/api/v1/session", "Log out", "public", None, status=204),
    Op("get", "/api/v1/overview", "Workers, queue totals and recent failures", "read",
       obj(workers=INT, queues=INT, ready=INT, delayed=INT, in_flight=INT, paused=INT,
           recent_failures=obj(tasks={"oneOf": [array(ref("Task")), {"type": "null"}]}, reason=STR))),
    Op("get", "/api/v1/metrics/history", "The last hour of samples, oldest first", "read",
       obj(interval=NUM, samples=array(ref("Sample")))),
    Op("get", "/api/v1/queues", "Every queue", "read", obj(queues=array(ref("Queue")), at=NUM)),
    Op("post", "/api/v1/queues/{queue}/pause", "Stop handing out the queue's tasks", "change",
       obj(queue=STR, paused=BOOL)),
    Op("post", "/api/v1/queues/{queue}/resume", "Hand out the queue's tasks again", "change",
       obj(queue=STR, paused=BOOL)),
    Op("post", "/api/v1/queues/{queue}/purge", "Drop the queue's ready and delayed tasks", "change",
       obj(queue=STR, purged=INT)),
    Op("get", "/api/v1/workers", "Workers connected to this server", "read", obj(workers=array(ref("Worker")), at=NUM)),
    Op("get", "/api/v1/tasks", "Search tasks (newest first), a page at a time", "read", ref("TaskPage"),
       query=("state", "queue", "name", "id", "since", "until", "order", "page_size", "page_token")),
    Op("post", "/api/v1/tasks", "Submit a task or a workflow", "change", ref("Submitted"), ref("Submit"), status=201),
    Op("get", "/api/v1/tasks/{task_id}", "One task in full", "read", ref("TaskDetail")),
    Op("post", "/api/v1/tasks/{task_id}/cancel", "Cancel a task, or every unfinished task of a workflow", "change",
       obj(cancelled_task_ids=array(STR))),
    Op("post", "/api/v1/tasks/{task_id}/retry", "Run an ended task's call again, as a new task", "change",
       obj(task_id=STR, retry_of=STR), status=201),
    Op("get", "/api/v1/workflows/{workflow_id}", "A workflow as a graph of its nodes", "read", ref("Workflow")),
    Op("get", "/api/v1/dead-letters", "Tasks that failed for good, oldest first", "read",
       ref("TaskPage"), query=("queue", "limit", "page_token")),
    Op("post", "/api/v1/dead-letters/replay", "Replay the given dead letters, or all of a queue (or of all queues)",
       "change", obj(task_ids=array(STR)), obj(task_ids=array(STR), queue=STR)),
    Op("delete", "/api/v1/dead-letters/{task_id}", "Take a task off the dead letters", "change", None, status=204),
    Op("get", "/api/v1/schedules", "Periodic schedules with their next fire times", "read",
       obj(schedules=array(ref("Schedule")))),
    Op("post", "/api/v1/schedules", "Create or replace a schedule", "change", ref("Schedule"), ref("NewSchedule"),
       status=201),
    Op("post", "/api/v1/schedules/{name}/run", "Submit the schedule's task now", "change", obj(task_id=STR),
       status=201),
    Op("delete", "/api/v1/schedules/{name}", "Delete a schedule", "change", None, status=204),
    Op("post", "/api/v1/schedules/{name}/pause", "Stop the schedule from firing until resumed", "change",
       ref("Schedule")),
    Op("post", "/api/v1/schedules/{name}/resume", "Fire the schedule again from its next tick after now", "change",
       ref("Schedule")),
    Op("get", "/api/v1/limits", "Rate limits in force", "read", obj(limits=array(ref("RateLimit")))),
    Op("put", "/api/v1/limits/{name}", "Set the rate limit of a task name", "change", ref("RateLimit"),
       obj(("rate",), rate=STR, burst=INT, per_key=BOOL)),
    Op("delete", "/api/v1/limits/{name}", "Remove a task name's stored rate limit", "change", None, status=204),
    Op("get", "/api/v1/registered-tasks", "Task names workers registered", "read",
       obj(tasks=array({"type": "object"}))),
    Op("get", "/api/v1/events/overview", "Server-Sent Events: `sample`", "read", stream=True),
    Op("get", "/api/v1/events/queues", "Server-Sent Events: `queues` (the table) on change", "read", stream=True),
    Op("get", "/api/v1/events/workers", "Server-Sent Events: `workers` (the table) on change", "read", stream=True),
    Op("get", "/api/v1/events/tasks", "Server-Sent Events: `changed` when tasks were written", "read", stream=True),
    Op("get", "/api/v1/events/tasks/{task_id}", "Server-Sent Events: `task` on each state change", "read",
       stream=True),
    Op("get", "/api/v1/events/workflows/{workflow_id}", "Server-Sent Events: `workflow` (the graph) on change",
       "read", stream=True),
    Op("get", "/api/v1/openapi.json", "This document", "public", {"type": "object"}),
)

ACCESS_NOTE = {
    "public": "",
    "read": " Needs a viewer or admin token.",
    "change": " Needs an admin token; from a browser, the X-CSRF-Token header.",
}


def _error(description: str) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": ref("Error")}}}


def _operation(op: Op) -> JSON:
    path_params = [part[1:-1] for part in op.path.split("/") if part.startswith("{")]
    parameters = [{"name": name, "in": "path", "required": True, "schema": STR} for name in path_params]
    parameters += [{"name": name, **PARAMETERS[name]} for name in op.query]
    responses: JSON = {}
    if op.stream:
        responses["200"] = {"description": "An event stream", "content": {"text/event-stream": {"schema": STR}}}
    elif op.answer is None:
        responses[str(op.status)] = {"description": "Done"}
    else:
        responses[str(op.status)] = {"description": "OK", "content": {"application/json": {"schema": op.answer}}}
    responses["400"] = _error("Bad input")
    if op.access != "public":
        responses["401"] = _error("No token, or an unknown one")
        responses["403"] = _error("The token's role may not do this, or the CSRF token is missing")
    if "{" in op.path:
        responses["404"] = _error("Not found")
    responses["503"] = _error("The broker or backend is out of reach; retry")
    found: JSON = {"summary": op.summary + ACCESS_NOTE[op.access], "operationId": _operation_id(op),
                   "parameters": parameters, "responses": responses}
    if op.body is not None:
        found["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.body}}}
    if op.access == "public":
        found["security"] = []
    return found


def _operation_id(op: Op) -> str:
    words = [part.strip("{}").replace("-", "_").replace(".", "_") for part in op.path.split("/")[3:]]
    return "_".join([op.method, *words])


@functools.cache
def document() -> JSON:
    paths: JSON = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor HTTP API", "version": "v1",
                 "description": "The dashboard's API: the same resources as AdminService and TaskService, "
                                "as plain JSON. See docs/dashboard.md."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "conveyor_token"},
            },
        },
        "security": [{"bearer": []}, {"cookie": []}],
    }
