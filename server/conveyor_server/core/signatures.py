"""Completes signatures before they are stored: ids, default queue, inherited trace headers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from conveyor.v1 import result_pb2, task_pb2

from .canvas.signatures import Holder, all_signatures

TRACE_HEADERS = ("traceparent", "tracestate")


def filled(
    signature: task_pb2.Signature,
    default_queue: str,
    *,
    task_id: str = "",
    inherit_headers: Mapping[str, str] | None = None,
) -> task_pb2.Signature:
    """A copy with an id (given, own or new UUID), a queue and the caller's trace context."""
    complete = task_pb2.Signature()
    complete.CopyFrom(signature)
    if not complete.id:
        complete.id = task_id or str(uuid.uuid4())
    if not complete.queue:
        complete.queue = default_queue
    for name in TRACE_HEADERS:
        if inherit_headers and name in inherit_headers and name not in complete.headers:
            complete.headers[name] = inherit_headers[name]
    return complete


def with_leading_arg(signature: task_pb2.Signature, value: task_pb2.Value | None) -> task_pb2.Signature:
    """The signature receiving a previous result: prepended unless immutable (Celery's rule)."""
    if value is None or signature.immutable:
        return signature
    changed = task_pb2.Signature()
    changed.CopyFrom(signature)
    del changed.args[:]
    changed.args.append(value)
    changed.args.extend(signature.args)
    return changed


def error_value(error: result_pb2.TaskError, task_id: str) -> task_pb2.Value:
    """How an error is handed to an on_error callback: one JSON object."""
    return task_pb2.Value(
        json_value=json.dumps(
            {"task_id": task_id, "type": error.type, "message": error.message, "traceback": error.traceback}
        )
    )


def queues_named(message: Holder, default_queue: str) -> set[str]:
    """Every queue the signatures inside `message` name, callbacks and workflow steps included
    (`default_queue` for a signature that names none)."""
    return {signature.queue or default_queue for signature in all_signatures(message)}
