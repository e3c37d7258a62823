"""Builders for task calls and workflows, in the spirit of Celery's canvas:

    chain(sig("add", 1, 2), sig("mul", 10))
    chord(group(sig("fetch", u) for u in urls), sig("merge"))

Callbacks: `.link(cb)` runs `cb` with the result on success, `.link_error(cb)` with the error (a
JSON object: task_id, type, message, traceback) on failure, on tasks, chains, groups and chords
(a chord's go to its callback, as Celery's do). docs/canvas.md has the semantics.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import task_pb2, workflow_pb2
from conveyor.values import set_seconds, to_value, to_value_map

# The server's default max_workflow_depth: a canvas nesting deeper (each chain, group or chord
# level counts, a chord's header two, each level of callbacks one) is refused before it is built.
MAX_DEPTH = 32
# Items per chunk task of Sig.map and Sig.starmap (the server's default too).
DEFAULT_CHUNK_SIZE = 100

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
        set_seconds(policy.initial, self.initial)
        set_seconds(policy.max, self.max)
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
    # Seconds after the start at which the task gets SoftTimeLimitExceeded (below time_limit).
    soft_time_limit: float | None = None
    immutable: bool = False
    idempotency_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    message_group: str = ""
    on_success: tuple[Sig, ...] = ()
    on_error: tuple[Sig, ...] = ()
    # Seconds during which a submit of an equal task (same unique_key, or name, queue and
    # arguments) returns the live one's id instead (released when it ends).
    unique_for: float | None = None
    unique_key: str = ""
    # Not started by then, it never runs and ends EXPIRED: seconds from submission (a number) or
    # a point in time (a datetime; naive means UTC), as Celery's `expires`.
    expires: float | dt.datetime | None = None
    # Do not store the task's return value (it ends SUCCESS without one); result() then raises
    # ResultIgnored, while its state can still be waited for.
    ignore_result: bool = False
    # Draw from this key's token bucket when the name's rate limit is per key (e.g. a customer id).
    rate_limit_key: str = ""
    # At most concurrency_limit tasks with this key run at once, across replicas (0: no limit).
    concurrency_key: str = ""
    concurrency_limit: int = 0
    # Seconds the task may wait, once ready, for a worker that registered its name; past it
    # it fails with Unroutable instead of waiting (None: it waits until such a worker connects).
    routing_timeout: float | None = None

    def set(self, **options: Any) -> Sig:
        """A copy with options changed: queue, priority, countdown, eta, retry, time_limit,
        soft_time_limit, immutable, idempotency_key, headers, id, message_group, unique_for, unique_key,
        expires, ignore_result, rate_limit_key, concurrency_key, concurrency_limit, routing_timeout."""
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
            ignore_result=self.ignore_result, rate_limit_key=self.rate_limit_key,
            concurrency_key=self.concurrency_key, concurrency_limit=self.concurrency_limit,
        )
        if self.expires is not None:
            signature.expires_at.CopyFrom(expires_at(self.expires))
        if self.countdown is not None:
            set_seconds(signature.countdown, self.countdown)
        if self.eta is not None:
            eta = self.eta if self.eta.tzinfo else self.eta.replace(tzinfo=dt.UTC)
            signature.eta.FromDatetime(eta.astimezone(dt.UTC).replace(tzinfo=None))
        if self.retry is not None:
            signature.retry.CopyFrom(self.retry.to_proto())
        if self.time_limit is not None:
            set_seconds(signature.time_limit, self.time_limit)
        if self.soft_time_limit is not None:
            set_seconds(signature.soft_time_limit, self.soft_time_limit)
        if self.routing_timeout is not None:
            set_seconds(signature.routing_timeout, self.routing_timeout)
        if self.unique_for is not None:
            set_seconds(signature.unique_for, self.unique_for)
            signature.unique_key = self.unique_key
        return signature

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(task=self.to_proto())

    def map(self, items: Iterable[Any], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Map:
        """Call this task once per item (Celery's task.map); the result is the list of results,
        one per item. The server runs the calls in chunk tasks of `chunk_size` items each."""
        return Map(self, tuple(items), star=False, chunk_size=chunk_size)

    def starmap(self, items: Iterable[Iterable[Any]], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Map:
        """Call this task once per item with the item as its positional args (Celery's
        task.starmap); the result is the list of results, one per item."""
        return Map(self, tuple(tuple(i) for i in items), star=True, chunk_size=chunk_size)

    def chunks(self, items: Iterable[Iterable[Any]], n: int) -> Map:
        """Split `items` (each a tuple of positional args) into tasks of `n` items each (Celery's
        task.chunks); the result is one list of results per chunk."""
        return Map(self, tuple(tuple(i) for i in items), star=True, chunk_size=n, nested=True)


def expires_at(expires: float | dt.datetime) -> Timestamp:
    """The absolute expiry of `expires`: seconds from now, or a datetime (naive means UTC)."""
    stamp = Timestamp()
    if isinstance(expires, dt.datetime):
        aware = expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)
        stamp.FromDatetime(aware.astimezone(dt.UTC).replace(tzinfo=None))
    else:
        stamp.FromNanoseconds(time.time_ns() + int(expires * 1e9))
    return stamp


def sig(name: str, *args: Any, **kwargs: Any) -> Sig:
    """A task call: sig("add", 1, 2)."""
    return Sig(name, args, kwargs)


def si(name: str, *args: Any, **kwargs: Any) -> Sig:
    """An immutable task call: it ignores the previous chain step's result."""
    return Sig(name, args, kwargs, immutable=True)


@dataclass(frozen=True)
class Chain:
    steps: tuple[Canvas, ...]
    # Run once when a step fails for good, with its error.
    on_error: tuple[Sig, ...] = ()
    # Run with the chain's result (its last step's) when it succeeds.
    on_success: tuple[Sig, ...] = ()

    def link(self, callback: Sig) -> Chain:
        """Run `callback` with the chain's result when it succeeds (Celery's chain.link)."""
        return replace(self, on_success=(*self.on_success, callback))

    def link_error(self, callback: Sig) -> Chain:
        """Run `callback` once with the error of the step that failed."""
        return replace(self, on_error=(*self.on_error, callback))

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(chain=workflow_pb2.Chain(
            steps=[s.to_workflow() for s in self.steps], on_error=[s.to_proto() for s in self.on_error],
            on_success=[s.to_proto() for s in self.on_success],
        ))


@dataclass(frozen=True)
class Group:
    members: tuple[Canvas, ...]
    # Run once when the group ends with failed members, with a GroupMemberFailed error.
    on_error: tuple[Sig, ...] = ()
    # Run with the list of member results once every member succeeded.
    on_success: tuple[Sig, ...] = ()
    # Run once per failed member, as it fails, with that member's error (Celery's errbacks).
    on_member_error: tuple[Sig, ...] = ()
    # More members, after `members`, read only when the group is submitted (group(generator)).
    # At the root of a submit (or as a root chord's header), more than 1,000 of them stream to
    # the server in pieces, never all held at once; fewer, or anywhere else, they are read into
    # one message as a list's are. Read once.
    lazy: Iterable[Canvas] | None = field(default=None, compare=False, repr=False)

    def link(self, callback: Sig) -> Group:
        """Run `callback` with the list of results once every member succeeded (Celery's
        group.link, which runs after the whole group here, not after its first member)."""
        return replace(self, on_success=(*self.on_success, callback))

    def link_error(self, callback: Sig, per_member: bool = False) -> Group:
        """Run `callback` with the error when the group fails: once, naming every failed member
        (default), or with `per_member=True` once per failed member, as Celery does."""
        if per_member:
            return replace(self, on_member_error=(*self.on_member_error, callback))
        return replace(self, on_error=(*self.on_error, callback))

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_proto(self) -> workflow_pb2.Group:
        members = (*self.members, *(self.lazy or ()))  # a lazy group nested in a canvas is read whole
        return workflow_pb2.Group(
            members=[m.to_workflow() for m in members], on_error=[s.to_proto() for s in self.on_error],
            on_success=[s.to_proto() for s in self.on_success],
            on_member_error=[s.to_proto() for s in self.on_member_error],
        )

    def to_workflow(self) -> workflow_pb2.Workflow:
        return workflow_pb2.Workflow(group=self.to_proto())


@dataclass(frozen=True)
class Chord:
    header: Group
    callback: Canvas
    failure_policy: Literal["fail", "continue"] = "fail"

    def link(self, callback: Sig) -> Chord:
        """Run `callback` with the chord's result: linked to its callback, as in Celery."""
        return replace(self, callback=self.callback.link(callback))

    def link_error(self, callback: Sig) -> Chord:
        """Run `callback` when the chord fails: linked to its callback (Celery links a chord's
        errback to its body), which fails with ChordMemberFailed when a header member failed."""
        return replace(self, callback=self.callback.link_error(callback))

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


@dataclass(frozen=True)
class Map:
    """`task` called once per item, run by the server in chunk tasks of `chunk_size` items (each
    chunk task's message holds only its items). Build one with Sig.map, .starmap or .chunks."""

    task: Sig
    items: tuple[Any, ...]
    # Each item is a tuple of positional args (starmap, chunks); else each is the only arg.
    star: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # One list of results per chunk (chunks); else one flat list, one result per item.
    nested: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {self.chunk_size}")
        if self.task.args:
            raise ValueError("a mapped task takes no args of its own: the items are its calls' args")

    def link(self, callback: Sig) -> Chain:
        """Run `callback` with the map's result (a chain of the map alone carries it)."""
        return Chain((self,), on_success=(callback,))

    def link_error(self, callback: Sig) -> Chain:
        """Run `callback` once with the error of the first failed chunk's group failure."""
        return Chain((self,), on_error=(callback,))

    def __or__(self, other: Canvas) -> Chain:
        return chain(self, other)

    def to_workflow(self) -> workflow_pb2.Workflow:
        items = [to_value(list(i) if self.star else i) for i in self.items]
        template = self.task.set(immutable=True).to_proto()  # chunks ignore a previous result
        return workflow_pb2.Workflow(map=workflow_pb2.Map(
            task=template, items=items, star=self.star, chunk_size=self.chunk_size, nested=self.nested,
        ))


Canvas = Union[Sig, Chain, Group, Chord, Map]  # noqa: UP007 - a runtime alias used in isinstance-free code


def chain(*steps: Canvas | Iterable[Canvas]) -> Chain:
    """Steps in order; each result is the next step's first arg (unless immutable)."""
    flat: list[Canvas] = []
    for step in steps:
        if isinstance(step, Chain) and not step.on_error and not step.on_success:
            flat.extend(step.steps)  # chain(chain(a, b), c) is chain(a, b, c), as in Celery
        elif isinstance(step, Sig | Chain | Group | Chord | Map):
            flat.append(step)
        else:
            flat.extend(step)
    return Chain(tuple(flat))


def group(*members: Canvas | Iterable[Canvas]) -> Group:
    """Members in parallel; the result is the list of member results in member order.

    One generator (any iterator) is not read here: group(sig("f", i) for i in range(100_000))
    reads it only when submitted, streaming the members to the server in pieces (see Group.lazy)."""
    if len(members) == 1 and isinstance(members[0], Iterator):
        return Group((), lazy=members[0])
    flat: list[Canvas] = []
    for member in members:
        if isinstance(member, Sig | Chain | Group | Chord | Map):
            flat.append(member)
        else:
            flat.extend(member)
    return Group(tuple(flat))


def chord(
    header: Group | Iterable[Canvas], callback: Canvas, failure_policy: Literal["fail", "continue"] = "fail"
) -> Chord:
    """Run `header` (a group), then `callback` once with the list of member results. A generator
    header is streamed at submit, as group(generator) is."""
    return Chord(header if isinstance(header, Group) else group(header), callback, failure_policy)


def depth_of(target: Canvas | task_pb2.Signature | workflow_pb2.Workflow, limit: int = MAX_DEPTH) -> int:
    """How deep `target` nests, counted as the server counts (the root is 1; a chain step or
    group member one more, a chord header member two, each level of callbacks one), without
    recursion: a canvas 500 levels deep is measured, not a RecursionError. Stops counting past
    `limit` (the result is then `limit + 1`)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(target, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend(_parts(node, depth))
    return deepest


def check_depth(target: Canvas | task_pb2.Signature | workflow_pb2.Workflow) -> None:
    """Refuse a canvas the server would refuse for its depth (and that protobuf could not carry
    much deeper), with a clear error instead of a DecodeError or RecursionError."""
    if depth_of(target) > MAX_DEPTH:
        raise ValueError(
            f"the canvas nests more than {MAX_DEPTH} levels deep (each chain, group or chord level "
            f"counts, and each level of callbacks); the server's default max_workflow_depth is {MAX_DEPTH}"
        )


def _parts(node: Any, depth: int) -> list[tuple[Any, int]]:
    """The children of one node, with their depths."""
    if isinstance(node, Sig | task_pb2.Signature):
        return [(c, depth + 1) for c in (*node.on_success, *node.on_error)]
    if isinstance(node, Chain | workflow_pb2.Chain):
        return [(c, depth + 1) for c in (*node.steps, *node.on_error, *node.on_success)]
    if isinstance(node, Group | workflow_pb2.Group):
        return [(c, depth + 1) for c in (*node.members, *node.on_error, *node.on_success, *node.on_member_error)]
    if isinstance(node, Chord | workflow_pb2.Chord):
        return [*_parts(node.header, depth + 1), (node.callback, depth + 1)]
    if isinstance(node, Map | workflow_pb2.Map):
        return [(node.task, depth + 1)]  # its chunk tasks, one level down as a group's members
    if isinstance(node, workflow_pb2.Workflow):
        kind = node.WhichOneof("kind")
        if kind == "task":
            return _parts(node.task, depth)
        return [] if kind is None else [(getattr(node, kind), depth)]
    return []
