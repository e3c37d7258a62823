"""Checks submitted signatures and workflows before anything is stored.

Sizes are checked against documented limits, so that a task accepted at submit can always be
delivered: its args and kwargs against `limits.max_args_bytes`, its headers against
MAX_HEADERS_BYTES, and the whole signature (args, headers and callbacks together, as a worker
receives it) against max_task_bytes(limits).

Workflows and callbacks share two limits: `max_workflow_tasks` counts every task and callback of
a submission, `max_workflow_depth` every level of nesting (each level of callbacks is one). Ids a
submitter gave must be distinct across its tasks and callbacks (a repeated one would never run).
Each canvas primitive (core/canvas/) checks its own rules through `_Walk`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from conveyor.v1 import task_pb2, workflow_pb2
from conveyor.values import seconds_of

from ..config import Limits
from .canvas.kinds import workflow_kind
from .canvas.primitives import primitive
from .canvas.signatures import Holder, all_signatures
from .errors import InvalidArgument

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TASK_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")
TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_PRIORITY = 9
# An ETA further out than this is almost certainly a unit mistake (ms vs s).
MAX_ETA_SECONDS = 366 * 86_400
# Headers of one signature (keys and values, UTF-8): trace context and small metadata.
MAX_HEADERS_BYTES = 64 * 1024
# Room in a whole signature beyond its args and headers: names, options, callbacks' own fields.
TASK_OVERHEAD_BYTES = 64 * 1024


def max_task_bytes(limits: Limits) -> int:
    """The largest whole serialized signature accepted: 1.125 MiB with the default limits."""
    return limits.max_args_bytes + MAX_HEADERS_BYTES + TASK_OVERHEAD_BYTES


def _size(count: int) -> str:
    """A size as people read it: 900 bytes, 64 KiB, 10.0 MiB."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{count} bytes"


def check_signature(sig: task_pb2.Signature, limits: Limits, where: str = "task") -> int:
    """Validate a task and its callbacks (which count toward the workflow limits: the task is
    depth 1, each level of callbacks one more); returns how many tasks they make."""
    if sig.on_success or sig.on_error or limits.max_workflow_tasks < 1:  # a lone task counts 1: no walk
        _check_count(sig, limits, where, "the task and its callbacks")
    walk = _Walk(limits)
    walk.task(sig, 1, where)
    return walk.count


def _check_one(sig: task_pb2.Signature, limits: Limits, where: str) -> None:
    """One signature's own fields (its callbacks are checked by the walk)."""
    if not sig.name:
        raise InvalidArgument(
            f"{where}: name is empty; set the task name the workers registered",
            field=f"{where}.name",
        )
    if not TASK_NAME.match(sig.name):
        raise InvalidArgument(
            f"{where}: name {sig.name[:80]!r} has whitespace or control characters",
            field=f"{where}.name",
        )
    if sig.id and not TASK_ID.match(sig.id):
        raise InvalidArgument(f"{where}: id {sig.id[:80]!r} must be 1-128 of [A-Za-z0-9_.:-]", field=f"{where}.id")
    if sig.queue and not QUEUE_NAME.match(sig.queue):
        raise InvalidArgument(
            f"{where}: queue {sig.queue[:80]!r} must be 1-64 of [A-Za-z0-9_.-]",
            field=f"{where}.queue",
        )
    if not 0 <= sig.priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"{where}: priority {sig.priority} is outside 0..{MAX_PRIORITY}",
            field=f"{where}.priority",
        )
    if sig.parent_id and not TASK_ID.match(sig.parent_id):
        raise InvalidArgument(
            f"{where}: parent_id {sig.parent_id[:80]!r} must be 1-128 of [A-Za-z0-9_.:-]",
            field=f"{where}.parent_id",
        )
    _check_sizes(sig, limits, where)
    _check_schedule(sig, where)
    if sig.HasField("retry"):
        _check_retry(sig.retry, where)
    _check_time_limits(sig, where)
    _check_result_options(sig, where)


def _check_sizes(sig: task_pb2.Signature, limits: Limits, where: str) -> None:
    whole = sig.ByteSize()
    if whole <= limits.max_args_bytes and whole <= MAX_HEADERS_BYTES:
        return  # the parts (args, headers) are smaller than the whole: each is within its limit
    args_bytes = sum(v.ByteSize() for v in sig.args) + sum(
        len(k) + v.ByteSize() for k, v in sig.kwargs.items()
    )
    if args_bytes > limits.max_args_bytes:
        raise InvalidArgument(
            f"{where}: args and kwargs take {args_bytes} bytes, over the limit of {limits.max_args_bytes}"
        )
    headers_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in sig.headers.items())
    if headers_bytes > MAX_HEADERS_BYTES:
        raise InvalidArgument(
            f"{where}: headers are {_size(headers_bytes)}, over the {_size(MAX_HEADERS_BYTES)} limit"
        )
    if whole > max_task_bytes(limits):
        raise InvalidArgument(
            f"{where}: the whole task (args, headers and callbacks) is {_size(whole)}, over the "
            f"{_size(max_task_bytes(limits))} limit"
        )


def _check_time_limits(sig: task_pb2.Signature, where: str) -> None:
    # Unset durations are 0 (read without ToTimedelta, which is slow on every submitted task).
    hard = seconds_of(sig.time_limit) if sig.HasField("time_limit") else 0.0
    soft = seconds_of(sig.soft_time_limit) if sig.HasField("soft_time_limit") else 0.0
    if hard < 0:
        raise InvalidArgument(f"{where}: time_limit is negative", field=f"{where}.time_limit")
    if soft < 0:
        raise InvalidArgument(f"{where}: soft_time_limit is negative", field=f"{where}.soft_time_limit")
    if soft and hard and soft >= hard:
        raise InvalidArgument(
            f"{where}: soft_time_limit ({soft:g} s) must be below time_limit ({hard:g} s), which stops the task"
        )
    if sig.HasField("unique_for") and seconds_of(sig.unique_for) <= 0:
        raise InvalidArgument(f"{where}: unique_for must be positive (it is how long the task stays unique)")
    if sig.HasField("routing_timeout") and seconds_of(sig.routing_timeout) < 0:
        raise InvalidArgument(f"{where}: routing_timeout is negative", field=f"{where}.routing_timeout")
    if sig.unique_key and not sig.HasField("unique_for"):
        raise InvalidArgument(f"{where}: unique_key needs unique_for (how long the task stays unique)")


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
        seconds = seconds_of(sig.countdown)
        if seconds < 0:
            raise InvalidArgument(f"{where}: countdown is negative")
        if seconds > MAX_ETA_SECONDS:
            raise InvalidArgument(f"{where}: countdown is more than a year")


def _check_result_options(sig: task_pb2.Signature, where: str) -> None:
    """expires_at must be a valid time (one already past is accepted: the task ends EXPIRED);
    a task that ignores its result has no value to hand to on_success callbacks."""
    if sig.HasField("expires_at") and (sig.expires_at.seconds <= 0 or not 0 <= sig.expires_at.nanos < 1_000_000_000):
        raise InvalidArgument(f"{where}: expires_at {sig.expires_at.seconds}s {sig.expires_at.nanos}ns is not a "
                              "valid time (seconds since 1970)")
    if sig.ignore_result and sig.on_success:
        raise InvalidArgument(f"{where}: ignore_result is set, so there is no result to pass to its on_success "
                              "callbacks; drop one of them")


def _check_retry(retry: task_pb2.RetryPolicy, where: str) -> None:
    if retry.max_attempts < 0:
        raise InvalidArgument(f"{where}: retry.max_attempts is negative")
    if not 0.0 <= retry.jitter <= 1.0:
        raise InvalidArgument(f"{where}: retry.jitter {retry.jitter} is outside 0..1")
    for name in ("initial", "max"):
        if retry.HasField(name) and seconds_of(getattr(retry, name)) < 0:
            raise InvalidArgument(f"{where}: retry.{name} is negative")


def check_workflow(workflow: workflow_pb2.Workflow, limits: Limits) -> int:
    """Validate the whole tree; returns how many tasks it holds (callbacks count)."""
    _check_count(workflow, limits, "workflow", "workflow")
    walk = _Walk(limits)
    walk.node(workflow, 1, "workflow")
    if walk.count > limits.max_workflow_tasks:  # maps expand: more tasks than the messages held
        raise InvalidArgument(
            f"workflow: workflow expands into {walk.count} tasks, over the limit of {limits.max_workflow_tasks} "
            "(max_workflow_tasks; callbacks count as tasks)"
        )
    return walk.count


def _check_count(message: Holder, limits: Limits, where: str, what: str) -> None:
    """Refuse an oversized tree before validating any of it (50,000 callbacks on one task
    are not each checked first)."""
    total = sum(1 for _ in all_signatures(message))
    if total > limits.max_workflow_tasks:
        raise InvalidArgument(
            f"{where}: {what} has {total} tasks, over the limit of {limits.max_workflow_tasks} "
            "(max_workflow_tasks; callbacks count as tasks)"
        )


class _Walk:
    """The submit-time walk (canvas.base.Checker): depth, unique ids, each signature. Each
    canvas primitive checks its own rules and hands its children and callbacks back here."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.count = 0
        self._ids: dict[str, str] = {}

    def node(self, workflow: workflow_pb2.Workflow, depth: int, where: str) -> None:
        self._check_depth(depth, where, "workflow nests")
        kind = workflow_kind(workflow)
        if kind is None:
            raise InvalidArgument(f"{where}: empty workflow node; set task, chain, group, chord or map")
        primitive(kind).check(workflow, self, depth, where)

    def task(self, signature: task_pb2.Signature, depth: int, where: str) -> None:
        self._check_depth(depth, where, "callbacks nest")
        self.count += 1
        if signature.id:
            if signature.id in self._ids:
                raise InvalidArgument(
                    f"{_short(where)}: id {signature.id[:80]!r} is already used by {_short(self._ids[signature.id])}; "
                    "each task and callback of a submission needs its own id (or none: the server gives one)"
                )
            self._ids[signature.id] = where
        _check_one(signature, self.limits, where)
        if signature.on_success:
            self.callbacks(signature.on_success, depth + 1, f"{where}.on_success")
        if signature.on_error:
            self.callbacks(signature.on_error, depth + 1, f"{where}.on_error")

    def callbacks(self, signatures: Sequence[task_pb2.Signature], depth: int, where: str) -> None:
        for i, callback in enumerate(signatures):
            self.task(callback, depth, f"{where}[{i}]")

    def planned_tasks(self, count: int, where: str) -> None:
        if self.count + count > self.limits.max_workflow_tasks:
            before = f" ({self.count + count} with the tasks before it)" if self.count else ""
            raise InvalidArgument(
                f"{_short(where)}: expands into {count} tasks{before}, over the limit of "
                f"{self.limits.max_workflow_tasks} (max_workflow_tasks; use bigger chunks)"
            )

    def _check_depth(self, depth: int, where: str, what: str) -> None:
        if depth > self.limits.max_workflow_depth:
            raise InvalidArgument(
                f"{_short(where)}: {what} deeper than the limit of {self.limits.max_workflow_depth} "
                "(max_workflow_depth; each level of callbacks counts)"
            )


def _short(where: str) -> str:
    """A location fit for a message: a deep one keeps its start and end."""
    return where if len(where) <= 160 else f"{where[:60]}...{where[-90:]}"
