"""What the `conveyor` command prints: plain JSON values (`-o json`) and readable tables and lines."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from conveyor.client import state_name
from conveyor.v1 import admin_service_pb2, result_pb2
from conveyor.values import from_value, seconds_of

_VALUE = "conveyor.v1.Value"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"


def plain(message: Message) -> dict[str, Any]:
    """The message as plain JSON values: every field present (zero values included), int64 as
    numbers, task values as their own JSON value, times as ISO 8601, durations in seconds,
    enums by name. Keys are the protobuf JSON names (camelCase)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not field.is_repeated and not message.HasField(field.name):
            out[field.json_name] = None
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.json_name] = {key: _scalar(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.json_name] = [_scalar(field, item) for item in value]
        else:
            out[field.json_name] = _scalar(field, value)
    return out


def _scalar(field: Any, value: Any) -> Any:  # Any: the stubs type descriptors as a union
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value) if field.enum_type else None
        # TASK_STATE_SUCCESS reads as SUCCESS, MISSED_TICKS_SKIP as SKIP.
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", field.enum_type.name).upper() + "_" if field.enum_type else ""
        return known.name.removeprefix(prefix) if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.message_type is None:
        return value
    full_name = field.message_type.full_name
    if full_name == _VALUE:
        return json_value(from_value(value))
    if full_name == _TIMESTAMP:
        return timestamp(value)
    if full_name == _DURATION:
        return seconds_of(value)
    return plain(value)


def json_value(value: Any) -> Any:
    """A task value as JSON can hold it (bytes as base64 text)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def timestamp(value: Any) -> str | None:
    """ISO 8601 in UTC; None for an unset (zero) time."""
    if not value.seconds and not value.nanos:
        return None
    at = value.ToDatetime(tzinfo=dt.UTC)
    return str(at.isoformat(timespec="milliseconds" if at.microsecond else "seconds").replace("+00:00", "Z"))


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def value_text(value: Any) -> str:
    """A result for people: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(json_value(value), ensure_ascii=False)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def queues_table(queues: Sequence[admin_service_pb2.QueueInfo]) -> str:
    if not queues:
        return "no queues"
    rows = [("QUEUE", "READY", "DELAYED", "IN-FLIGHT", "UNROUTABLE", "PAUSED")]
    rows += [(q.name, str(q.ready), str(q.delayed), str(q.in_flight), str(q.unroutable), "yes" if q.paused else "no")
             for q in queues]
    return table(rows)


def workers_table(workers: Sequence[admin_service_pb2.WorkerInfo]) -> str:
    if not workers:
        return "no workers connected"
    rows = [("WORKER", "LANGUAGE", "HOST", "QUEUES", "IN-FLIGHT", "CONNECTED")]
    rows += [(w.worker_id, w.language or "-", w.hostname or "-", ",".join(w.queues) or "-",
              f"{w.in_flight}/{w.max_in_flight}", timestamp(w.connected_at) or "-") for w in workers]
    return table(rows)


def dead_table(tasks: Sequence[result_pb2.TaskResult]) -> str:
    """One line per dead letter: id, name, queue, error, when it failed."""
    if not tasks:
        return "no dead letters"
    rows = [("ID", "NAME", "QUEUE", "FAILED AT", "ERROR")]
    for task in tasks:
        error = f"{task.error.type}: {task.error.message}" if task.error.type else task.error.message
        rows.append((task.task_id, task.name, task.queue or "-", timestamp(task.finished_at) or "-",
                     " ".join(error.split()) or "-"))
    return table(rows)


def schedules_table(schedules: Sequence[admin_service_pb2.Schedule]) -> str:
    if not schedules:
        return "no schedules"
    rows = [("NAME", "CRON", "TASK", "NEXT RUN", "LAST RUN")]
    rows += [(s.name, s.cron, s.task.name, "paused" if s.paused else timestamp(s.next_run_at) or "-",
              timestamp(s.last_run_at) or "-") for s in schedules]
    return table(rows)


def task_text(result: result_pb2.TaskResult, extra: Sequence[str] = ()) -> str:
    """A task's record as `key: value` lines, its result or error and `extra` lines last, then its history."""
    lines = [f"id:        {result.task_id}", f"name:      {result.name or '-'}", f"queue:     {result.queue or '-'}",
             f"state:     {state_name(result.state)}", f"attempts:  {result.attempts}"]
    if result.workflow_id:
        lines.append(f"workflow:  {result.workflow_id}")
    if result.worker_id:
        lines.append(f"worker:    {result.worker_id}")
    for label, at in (("submitted", result.submitted_at), ("started", result.started_at),
                      ("finished", result.finished_at)):
        if at.seconds or at.nanos:
            lines.append(f"{label + ':':<10} {timestamp(at)}")
    if result.state == result_pb2.TASK_STATE_SUCCESS:
        lines.append(f"result:    {value_text(from_value(result.result))}")
    elif result.error.type or result.error.message:
        lines.append(f"error:     {result.error.type}: {result.error.message}")
    lines += extra
    for transition in result.history:
        lines.append(f"  {timestamp(transition.at)}  {state_name(transition.state)}")
    return "\n".join(lines)


def inspection_text(inspected: admin_service_pb2.InspectTaskResponse) -> str:
    """`conveyor inspect`: the record as task_text shows it, and what the server knows beyond it."""
    result = inspected.result
    if result.task_id.startswith("wf-"):
        return task_text(result)  # a workflow's combined result has no lease or record of its own
    lease = "-"
    if inspected.lease_holder:
        lease = f"held by {inspected.lease_holder} until {timestamp(inspected.lease_expires_at) or '-'}"
    extra = [f"lease:     {lease}", f"deliveries: {inspected.deliveries}",
             f"enqueued:  {'yes' if inspected.enqueued else 'no'}"]
    if inspected.workflow_node_id:
        extra.append(f"node:      {inspected.workflow_node_id}")
    pending = "pending (promised, not yet done)" if inspected.follow_ups_pending else "none pending"
    extra.append(f"follow-ups: {pending}")
    return task_text(result, extra)
