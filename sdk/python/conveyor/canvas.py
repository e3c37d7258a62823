"""Builders for task calls and workflows, in the spirit of Celery's canvas:

    chain(sig("add", 1, 2), sig("mul", 10))
    chord(group(sig("fetch", u) for u in urls), sig("merge"))
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

from conveyor.v1 import task_pb2, workflow_pb2
from conveyor.values import to_value, to_value_map

BACKOFF_KINDS = {
    "exponential": task_pb2.BACKOFF_KIND_EXPONENTIAL,
    "fibonacci": task_pb2.BACKOFF_KIND_FIBONACCI,
    "fixed": task_pb2.BACKOFF_KIND_FIXED,
}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failing task runs again (attempts include the first)."""

    max_attempts: int = 3
    backoff: Literal["exponential", "fibonacci", "fixed"] = "exponential"
    initial: float = 1.0
    max: float = 3600.0
    jitter: float = 0.0

    def to_proto(self) -> task_pb2.RetryPolicy:
        policy = task_pb2.RetryPolicy(
            max_attempts=self.max_attempts, backoff=BACKOFF_KINDS[self.backoff], jitter=self.jitter
        )
        policy.initial.FromNanoseconds(int(self.initial * 1e9))
        policy.max.FromNanoseconds(int(self.max * 1e9))
        return policy


@dataclass(frozen=True)
class Sig:
    """One task call. Options are set with .set(); kwargs go to the task."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    queue: str = ""
    priority: int = 0
    countdown: float | None = None
    eta: dt.datetime | None = None
    retry: RetryPolicy | None = None
    time_limit: float | None = None
    immutable: bool = False
    idempotency_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    message_group: str = ""
    on_success: tuple[Sig, ...] = ()
    on_error: tuple[Sig, ...] = ()

    def set(self, **options: Any) -> Sig:
        """A copy with options changed: queue, priority, countdown, eta, retry, time_limit,
        immutable, idempotency_key, headers, id, message_group."""
        return replace(self, **options)

    def link(self, callback: Sig) -> Sig:
        """Run `callback` with this task's result when it succeeds."""
        return replace(self, on_success=(*self.on_success, callback))

    def link_error(self, callback: Sig) -> Sig:
        """Run `callback` with this task's error when it fails for good."""
        return replace(self, on_error=(*self.on_error, callback))

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_proto(self) -> task_pb2.Signature:
        signature = task_pb2.Signature(
            id=self.id, name=self.name, queue=self.queue, args=[to_value(a) for a in self.args],
            kwargs=to_value_map(self.kwargs), headers=self.headers, priority=self.priority,
            immutable=self.immutable, idempotency_key=self.idempotency_key, message_group=self.message_group,
            on_success=[s.to_proto() for s in self.on_success], on_error=[s.to_proto() for s in self.on_error],
        )
        if self.countdown is not None:
            signature.countdown.FromNanoseconds(int(self.countdown * 1e9))
        if self.eta is not None:
            eta = self.eta if self.eta.tzinfo else self.eta.replace(tzinfo=dt.UTC)
            signature.eta.FromDatetime(eta.astimezone(dt.UTC).replace(tzinfo=None))
        if self.retry is not None:
            signature.retry.CopyFrom(self.retry.to_proto())
        if self.time_limit is not None:
            signature.time_limit.FromNanoseconds(int(self.time_limit * 1e9))
        return signature

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(task=self.to_proto())


def sig(name: str, *args: Any, **kwargs: Any) -> Sig:
    """A task call: sig("add", 1, 2)."""
    return Sig(name, args, kwargs)


def si(name: str, *args: Any, **kwargs: Any) -> Sig:
    """An immutable task call: it ignores the previous chain step's result."""
    return Sig(name, args, kwargs, immutable=True)


@dataclass(frozen=True)
class Chain:
    steps: tuple[Canvas, ...]
    on_error: tuple[Sig, ...] = ()

    def link_error(self, callback: Sig) -> Chain:
        return replace(self, on_error=(*self.on_error, callback))

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(chain=workflow_pb2.Chain(
            steps=[s.to_workflow() for s in self.steps], on_error=[s.to_proto() for s in self.on_error]
        ))


@dataclass(frozen=True)
class Group:
    members: tuple[Canvas, ...]
    on_error: tuple[Sig, ...] = ()

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_proto(self) -> workflow_pb2.Group:
        return workflow_pb2.Group(
            members=[m.to_workflow() for m in self.members], on_error=[s.to_proto() for s in self.on_error]
        )

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(group=self.to_proto())


@dataclass(frozen=True)
class Chord:
    header: Group
    callback: Canvas
    failure_policy: Literal["fail", "continue"] = "fail"

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_workflow(self) -> workflow_pb2.Workflow:
        policy = (
            workflow_pb2.CHORD_FAILURE_POLICY_CONTINUE
            if self.failure_policy == "continue"
            else workflow_pb2.CHORD_FAILURE_POLICY_FAIL
        )
        return workflow_pb2.Workflow(chord=workflow_pb2.Chord(
            header=self.header.to_proto(), callback=self.callback.to_workflow(), failure_policy=policy
        ))


Canvas = Union[Sig, Chain, Group, Chord]  # noqa: UP007 - a runtime alias used in isinstance-free code


def chain(*steps: Canvas | Iterable[Canvas]) -> Chain:
    """Steps in order; each result is the next step's first arg (unless immutable)."""
    flat: list[Canvas] = []
    for step in steps:
        if isinstance(step, Chain) and not step.on_error:
            flat.extend(step.steps)  # chain(chain(a, b), c) is chain(a, b, c), as in Celery
        elif isinstance(step, Sig | Chain | Group | Chord):
            flat.append(step)
        else:
            flat.extend(step)
    return Chain(tuple(flat))


def group(*members: Canvas | Iterable[Canvas]) -> Group:
    """Members in parallel; the result is the list of member results in member order."""
    flat: list[Canvas] = []
    for member in members:
        if isinstance(member, Sig | Chain | Group | Chord):
            flat.append(member)
        else:
            flat.extend(member)
    return Group(tuple(flat))


def chord(
    header: Group | Iterable[Canvas], callback: Canvas, failure_policy: Literal["fail", "continue"] = "fail"
) -> Chord:
    """Run `header` (a group), then `callback` once with the list of member results."""
    return Chord(header if isinstance(header, Group) else group(header), callback, failure_policy)
