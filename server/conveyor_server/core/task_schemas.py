"""Submit-time checks of task calls against what workers declared.

In every mode: a json_value must hold valid JSON (strict: no NaN or Infinity), or the submit is
refused before a worker meets it. With `strict` (per SubmitRequest, or the server-wide
`strict_tasks` setting), every task of the submission (each step, member, callback and link of
a workflow, as canvas.signatures.placed_signatures finds them) must also be one that some worker
registered (core/task_registry.py), called as its call schema says; else INVALID_ARGUMENT names
the task and the field:

    request.task.args[1]: 'abc' is not of type 'integer' (task 'add')

A task that receives the previous result as its first arg (a chain step after the first, a
chord callback, every callback and link; unless immutable) is checked with that arg
taken as given: it is not known at submit. When workers of one name declare different schemas
(a rolling deploy), a call that matches any of them is accepted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from conveyor.errors import UnencodableValue
from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor.values import to_value

from .call_schemas import BadJson, BadSchema, call_of, compiled, mismatch, parse_json
from .canvas.signatures import Placed, placed_signatures
from .errors import InvalidArgument
from .task_registry import KnownTask, Snapshot, TaskRegistry

# A strict submit that would be refused reads the registry again first (unless its snapshot is
# younger than this): a worker that connected to another replica a moment ago counts, and a
# client sending bad calls in a loop costs at most 20 registry reads a second.
RELOAD_BEFORE_REFUSING_SECONDS = 0.05


# A task call to check: where it sits and whether it receives a previous result as its first arg.
Call = Placed


def calls_of(request: task_service_pb2.SubmitRequest, where: str) -> Iterator[Call]:
    """Every task call a (structurally valid) request holds, callbacks and links included; a
    map's task as one call per item."""
    for placed in placed_signatures(request, where):
        if placed.map is None:
            yield placed
        else:
            yield from _item_calls(placed.map, placed.where.removesuffix(".task"))


def _item_calls(map_: workflow_pb2.Map, where: str) -> Iterator[Call]:
    """A map's calls, one per item, as its chunk tasks will make them."""
    for i, item in enumerate(map_.items):
        args = [item]  # a starmap item that is not a list is checked as it stands (and refused)
        if map_.star and item.WhichOneof("kind") == "json_value" and _is_json(item.json_value):
            listed = parse_json(item.json_value)
            if isinstance(listed, list):
                with contextlib.suppress(UnencodableValue):
                    args = [to_value(arg) for arg in listed]
        call = task_pb2.Signature(name=map_.task.name, args=args, kwargs=map_.task.kwargs)
        yield Call(call, f"{where}.items[{i}]", leading=False)


def all_json_valid(request: task_service_pb2.SubmitRequest) -> bool:
    """True when every json_value in the request is valid JSON: the quick walk, whose messages
    name nothing (check_json_values does, for a request that fails it)."""
    for placed in placed_signatures(request):
        signature = placed.signature
        values: Iterable[task_pb2.Value] = signature.args
        if signature.kwargs:
            values = [*values, *signature.kwargs.values()]
        if placed.map is not None:
            values = [*values, *placed.map.items]
        for value in values:
            if value.WhichOneof("kind") == "json_value" and not _is_json(value.json_value):
                return False
    return True


def _is_json(text: str) -> bool:
    try:
        parse_json(text)
    except BadJson:
        return False
    return True


def check_json_values(args: Sequence[task_pb2.Value], kwargs: Mapping[str, task_pb2.Value], where: str) -> None:
    """Refuse a json_value among `args` and `kwargs` that is not valid JSON, naming its field
    (`<where>.args[1]`, `<where>.kwargs['k']`)."""
    for i, value in enumerate(args):
        if value.WhichOneof("kind") == "json_value":
            _check_json(value.json_value, f"{where}.args[{i}]")
    for key, value in kwargs.items():
        if value.WhichOneof("kind") == "json_value":
            _check_json(value.json_value, f"{where}.kwargs[{key!r}]")


def _check_json(text: str, field: str) -> None:
    try:
        parse_json(text)
    except BadJson as exc:
        raise InvalidArgument(f"{field}: json_value is not valid JSON ({exc})") from None


def call_problem(known: KnownTask, call: Call) -> str | None:
    """How the call breaks every schema its task's workers declared; None when it matches one."""
    schemas = known.call_schemas()
    if "" in schemas:
        return None
    instance = call_of(call.signature, call.leading)
    first: str | None = None
    for text in schemas:
        try:
            problem = mismatch(compiled(text), instance, call.leading)
        except BadSchema:  # checked at Hello; a schema that cannot be compiled constrains nothing
            return None
        if problem is None:
            return None
        first = first or problem
    return first


def first_problem(snapshot: Snapshot, calls: Sequence[Call]) -> str | None:
    for call in calls:
        name = call.signature.name
        known = snapshot.tasks.get(name)
        if known is None:
            return f"{call.where}: no worker has registered task {name!r} (a strict submit needs one)"
        problem = call_problem(known, call)
        if problem is not None:
            return f"{call.where}.{problem} (task {name!r})"
    return None


class SubmitChecks:
    """The checks Submitter.submit runs on every submission."""

    def __init__(self, registry: TaskRegistry, strict_tasks: bool) -> None:
        self.registry = registry
        self.strict_tasks = strict_tasks

    async def check(self, requests: Sequence[task_service_pb2.SubmitRequest]) -> None:
        strict: list[Call] = []
        for index, request in enumerate(requests):
            if not (self.strict_tasks or request.strict) and all_json_valid(request):
                continue  # the common case, on every submit: one quick walk, no calls listed
            calls = list(calls_of(request, f"requests[{index}]" if len(requests) > 1 else "request"))
            for call in calls:
                check_json_values(call.signature.args, call.signature.kwargs, call.where)
            if self.strict_tasks or request.strict:
                strict.extend(calls)
        if strict:
            await self._check_registered(strict)

    async def _check_registered(self, calls: Sequence[Call]) -> None:
        snapshot = await self.registry.current()
        problem = first_problem(snapshot, calls)
        if problem is not None and time.monotonic() - snapshot.loaded_at > RELOAD_BEFORE_REFUSING_SECONDS:
            problem = first_problem(await self.registry.load(), calls)
        if problem is not None:
            raise InvalidArgument(problem)
