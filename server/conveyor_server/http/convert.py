"""Protobuf messages as the plain JSON the HTTP API speaks: task values as JSON values (bytes as
{"$bytes": base64}), states as short names ("SUCCESS"), times as RFC 3339 strings, durations
as seconds."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, task_service_pb2
from conveyor.values import seconds_of, to_jsonable

JSON = dict[str, Any]
STATE_PREFIX = "TASK_STATE_"
LEASED_STATES = frozenset({result_pb2.TASK_STATE_RECEIVED, result_pb2.TASK_STATE_STARTED})
# W3C traceparent: version-traceid-parentid-flags.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def state_name(state: int) -> str:
    return str(result_pb2.TaskState.Name(state)).removeprefix(STATE_PREFIX)  # type: ignore[arg-type]


def state_number(name: str) -> int | None:
    """The TaskState of "SUCCESS" (or "success", or "TASK_STATE_SUCCESS"); None if unknown."""
    text = name.strip().upper()
    try:
        return int(result_pb2.TaskState.Value(text if text.startswith(STATE_PREFIX) else STATE_PREFIX + text))
    except ValueError:
        return None


def when(stamp: Timestamp, present: bool = True) -> str | None:
    """RFC 3339 in UTC with milliseconds; None for an unset field."""
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    moment = datetime.fromtimestamp(seconds_of(stamp), UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trace_id(headers: Mapping[str, str]) -> str:
    found = TRACEPARENT.match(headers.get("traceparent", ""))
    return found.group(1) if found else ""


def _error(error: result_pb2.TaskError) -> JSON:
    return {"type": error.type, "message": error.message, "traceback": error.traceback}


def signature(sig: task_pb2.Signature) -> JSON:
    return {
        "id": sig.id, "name": sig.name, "queue": sig.queue,
        "args": [to_jsonable(v) for v in sig.args],
        "kwargs": {k: to_jsonable(v) for k, v in sorted(sig.kwargs.items())},
        "headers": dict(sorted(sig.headers.items())),
        "priority": sig.priority,
        "eta": when(sig.eta, sig.HasField("eta")),
        "countdown": seconds_of(sig.countdown) if sig.HasField("countdown") else None,
        "time_limit": seconds_of(sig.time_limit) if sig.HasField("time_limit") else None,
        "max_attempts": sig.retry.max_attempts if sig.HasField("retry") else None,
        "idempotency_key": sig.idempotency_key,
        "parent_id": sig.parent_id,
    }


def task(result: result_pb2.TaskResult) -> JSON:
    """A task as listed: no history, no call."""
    return {
        "id": result.task_id, "name": result.name, "queue": result.queue, "state": state_name(result.state),
        "attempts": result.attempts, "worker_id": result.worker_id, "workflow_id": result.workflow_id,
        "submitted_at": when(result.submitted_at), "started_at": when(result.started_at),
        "finished_at": when(result.finished_at),
        "error": _error(result.error) if result.HasField("error") else None,
    }


def task_detail(result: result_pb2.TaskResult, record: records_pb2.TaskRecord | None, trace_url: str) -> JSON:
    """Everything about one task: its call, result or error, history, lease and trace."""
    found_trace = trace_id(result.signature.headers)
    detail = task(result) | {
        "call": signature(result.signature),
        "result": to_jsonable(result.result) if result.HasField("result") else None,
        "progress": to_jsonable(result.progress) if result.HasField("progress") else None,
        "history": [
            {"state": state_name(t.state), "at": when(t.at), "attempt": t.attempt, "worker_id": t.worker_id,
             "error": _error(t.error) if t.HasField("error") else None}
            for t in result.history
        ],
        "trace_id": found_trace,
        "trace_url": trace_url.replace("{trace_id}", found_trace) if trace_url and found_trace else "",
        "lease": None,
    }
    if record is not None:
        detail["lease"] = {
            # A worker holds it while it runs (the token stays in the record after it ends).
            "held": bool(record.lease_token) and result.state in LEASED_STATES,
            "deliveries": record.deliveries,
            "renewed_at": when(record.lease_renewed_at, record.HasField("lease_renewed_at")),
            "retry_at": when(record.retry_at, record.HasField("retry_at")),
        }
        detail["attempt_errors"] = [_error(e) for e in record.attempt_errors]
    return detail


def workflow_node(node: task_service_pb2.WorkflowNode) -> JSON:
    found = node.task if node.HasField("task") else None
    return {
        "node_id": node.node_id, "kind": node.kind, "state": state_name(node.state),
        "task": None if found is None else {"id": found.task_id, "name": found.name, "state": state_name(found.state)},
        "children": [workflow_node(child) for child in node.children],
    }


def workflow(response: task_service_pb2.GetWorkflowResponse) -> JSON:
    return {"workflow_id": response.workflow_id, "result_task_id": response.result_task_id,
            "root": workflow_node(response.root)}


def queue(info: admin_service_pb2.QueueInfo) -> JSON:
    return {"name": info.name, "ready": info.ready, "delayed": info.delayed, "in_flight": info.in_flight,
            "unroutable": info.unroutable, "paused": info.paused}


def schedule(item: admin_service_pb2.Schedule, next_runs: Iterable[str]) -> JSON:
    return {
        "name": item.name, "cron": item.cron, "task": signature(item.task),
        "missed_ticks": str(admin_service_pb2.MissedTicks.Name(item.missed_ticks)).removeprefix("MISSED_TICKS_"),
        "next_run_at": when(item.next_run_at, item.HasField("next_run_at")),
        "last_run_at": when(item.last_run_at, item.HasField("last_run_at")),
        "next_runs": list(next_runs),
        "paused": item.paused,
    }


def message(value: Message) -> JSON:
    """Any other message, field names as in the .proto."""
    converted: JSON = json_format.MessageToDict(
        value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return converted
