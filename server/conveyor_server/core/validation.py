"""Checks submitted signatures and workflows before anything is stored."""

from __future__ import annotations

import re
import time

from conveyor.v1 import task_pb2, workflow_pb2

from ..config import Limits
from .errors import InvalidArgument

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TASK_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")
TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_PRIORITY = 9
# An ETA further out than this is almost certainly a unit mistake (ms vs s).
MAX_ETA_SECONDS = 366 * 86_400


def check_signature(sig: task_pb2.Signature, limits: Limits, where: str = "task") -> None:
    if not sig.name:
        raise InvalidArgument(f"{where}: name is empty; set the task name the workers registered")
    if not TASK_NAME.match(sig.name):
        raise InvalidArgument(f"{where}: name {sig.name[:80]!r} has whitespace or control characters")
    if sig.id and not TASK_ID.match(sig.id):
        raise InvalidArgument(f"{where}: id {sig.id[:80]!r} must be 1-128 of [A-Za-z0-9_.:-]")
    if sig.queue and not QUEUE_NAME.match(sig.queue):
        raise InvalidArgument(f"{where}: queue {sig.queue[:80]!r} must be 1-64 of [A-Za-z0-9_.-]")
    if not 0 <= sig.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"{where}: priority {sig.priority} is outside 0..{MAX_PRIORITY}")
    args_bytes = sum(v.ByteSize() for v in sig.args) + sum(
        len(k) + v.ByteSize() for k, v in sig.kwargs.items()
    )
    if args_bytes > limits.max_args_bytes:
        raise InvalidArgument(
            f"{where}: args and kwargs take {args_bytes} bytes, over the limit of {limits.max_args_bytes}"
        )
    _check_schedule(sig, where)
    _check_retry(sig.retry, where)
    if sig.HasField("time_limit") and sig.time_limit.ToTimedelta().total_seconds() < 0:
        raise InvalidArgument(f"{where}: time_limit is negative")
    for i, callback in enumerate(sig.on_success):
        check_signature(callback, limits, f"{where}.on_success[{i}]")
    for i, callback in enumerate(sig.on_error):
        check_signature(callback, limits, f"{where}.on_error[{i}]")


def _check_schedule(sig: task_pb2.Signature, where: str) -> None:
    if sig.HasField("eta") and sig.HasField("countdown"):
        raise InvalidArgument(f"{where}: set eta or countdown, not both")
    if sig.HasField("eta"):
        if not 0 <= sig.eta.nanos < 1_000_000_000:
            raise InvalidArgument(f"{where}: eta has invalid nanos {sig.eta.nanos}")
        if sig.eta.seconds - time.time() > MAX_ETA_SECONDS:
            raise InvalidArgument(f"{where}: eta is more than a year ahead; is it in milliseconds?")
        if sig.eta.seconds <= 0:
            raise InvalidArgument(f"{where}: eta {sig.eta.seconds} is not a valid time (seconds since 1970)")
    if sig.HasField("countdown"):
        seconds = sig.countdown.seconds + sig.countdown.nanos / 1e9
        if seconds < 0:
            raise InvalidArgument(f"{where}: countdown is negative")
        if seconds > MAX_ETA_SECONDS:
            raise InvalidArgument(f"{where}: countdown is more than a year")


def _check_retry(retry: task_pb2.RetryPolicy, where: str) -> None:
    if retry.max_attempts < 0:
        raise InvalidArgument(f"{where}: retry.max_attempts is negative")
    if not 0.0 <= retry.jitter <= 1.0:
        raise InvalidArgument(f"{where}: retry.jitter {retry.jitter} is outside 0..1")
    for name in ("initial", "max"):
        if retry.HasField(name) and getattr(retry, name).ToTimedelta().total_seconds() < 0:
            raise InvalidArgument(f"{where}: retry.{name} is negative")


def check_workflow(workflow: workflow_pb2.Workflow, limits: Limits) -> int:
    """Validate the whole tree; returns how many tasks it holds."""
    return _walk(workflow, limits, depth=1, where="workflow")


def _walk(node: workflow_pb2.Workflow, limits: Limits, depth: int, where: str) -> int:
    if depth > limits.max_workflow_depth:
        raise InvalidArgument(f"{where}: workflow nests deeper than the limit of {limits.max_workflow_depth}")
    kind = node.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where}: empty workflow node; set task, chain, group or chord")
    if kind == "task":
        check_signature(node.task, limits, where)
        return 1 + len(node.task.on_success) + len(node.task.on_error)
    if kind == "chain":
        if not node.chain.steps:
            raise InvalidArgument(f"{where}: a chain needs at least one step")
        total = sum(_walk(s, limits, depth + 1, f"{where}.chain[{i}]") for i, s in enumerate(node.chain.steps))
        for i, callback in enumerate(node.chain.on_error):
            check_signature(callback, limits, f"{where}.chain.on_error[{i}]")
    elif kind == "group":
        total = sum(
            _walk(m, limits, depth + 1, f"{where}.group[{i}]") for i, m in enumerate(node.group.members)
        )
    else:
        if not node.chord.HasField("callback"):
            raise InvalidArgument(f"{where}: a chord needs a callback")
        total = sum(
            _walk(m, limits, depth + 2, f"{where}.chord.header[{i}]")
            for i, m in enumerate(node.chord.header.members)
        ) + _walk(node.chord.callback, limits, depth + 1, f"{where}.chord.callback")
    if total > limits.max_workflow_tasks:
        raise InvalidArgument(f"{where}: workflow has {total} tasks, over the limit of {limits.max_workflow_tasks}")
    return total
