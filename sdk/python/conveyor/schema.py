"""What a worker tells the server about its tasks (Hello.tasks): a description and a JSON Schema
of the calls each accepts, derived from the function's signature and type hints.

The schema describes one call as the server sees it, the object {"args": [...], "kwargs": {...}}
(see TaskInfo.call_schema in proto/conveyor/v1/task.proto). For

    def add(x: int, y: int = 0, *, scale: float = 1.0) -> int: ...

args may hold x then y (integers), kwargs x, y and scale, nothing else; x is required, either
positionally or by keyword. Hints map as int -> integer, float -> number, str -> string,
bool -> boolean, bytes -> base64 text, None -> null, list[T] / Sequence[T] / tuple[T, ...] ->
array of T, dict[str, T] -> object of T, T | None and Optional[T] -> either, Literal -> enum.
A parameter without a hint, or with a hint this does not know (a class, a TypeVar), accepts any
value; *args and **kwargs accept any number of extra values. Derivation never fails: a function
whose hints cannot be read gets a schema that accepts any call.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from conveyor.v1 import task_pb2

log = logging.getLogger("conveyor.worker")
JsonSchema = dict[str, Any]
DRAFT = "https://json-schema.org/draft/2020-12/schema"
_SEQUENCES = (list, set, frozenset, collections.abc.Sequence, collections.abc.Set)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_SCALARS: dict[Any, JsonSchema] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bytes: {"type": "string", "contentEncoding": "base64"},
    type(None): {"type": "null"},
}


def task_infos(tasks: Mapping[str, Callable[..., Any]], descriptions: Mapping[str, str]) -> list[task_pb2.TaskInfo]:
    """One TaskInfo per registered task, sorted by name (what Hello.tasks carries)."""
    return [task_info(name, tasks[name], descriptions.get(name)) for name in sorted(tasks)]


def task_info(name: str, function: Callable[..., Any], description: str | None = None) -> task_pb2.TaskInfo:
    """The TaskInfo of `function` registered as `name`; the description defaults to the first
    line of its docstring."""
    schema = call_schema(function)
    return task_pb2.TaskInfo(
        name=name,
        description=first_line(inspect.getdoc(function)) if description is None else description,
        call_schema=json.dumps(schema, separators=(",", ":"), sort_keys=True) if schema else "",
    )


def first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def call_schema(function: Callable[..., Any]) -> JsonSchema:
    """The JSON Schema of calls `function` accepts; {} (anything) when it cannot be derived."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return {}
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:  # a hint naming something undefined: check the types of none
        log.debug("type hints of %r cannot be read (%s); its args are not typed", function, exc)
        hints = {}
    return _call_schema(signature, hints)


def _call_schema(signature: inspect.Signature, hints: Mapping[str, Any]) -> JsonSchema:
    P = inspect.Parameter
    positional: list[JsonSchema] = []
    keywords: JsonSchema = {}
    leading_required = 0  # positional-only parameters without a default, which come first
    either_required: list[tuple[int, str]] = []  # (position, name) of required either-way ones
    required_keywords: list[str] = []
    extra_args: JsonSchema | bool = False
    extra_kwargs: JsonSchema | bool = False
    for parameter in signature.parameters.values():
        schema = schema_of(hints[parameter.name]) if parameter.name in hints else {}
        required = parameter.default is P.empty
        if parameter.kind is P.POSITIONAL_ONLY:
            if required:
                leading_required += 1
            positional.append(schema)
        elif parameter.kind is P.POSITIONAL_OR_KEYWORD:
            if required:
                either_required.append((len(positional), parameter.name))
            positional.append(schema)
            keywords[parameter.name] = schema
        elif parameter.kind is P.VAR_POSITIONAL:
            extra_args = schema or True
        elif parameter.kind is P.KEYWORD_ONLY:
            keywords[parameter.name] = schema
            if required:
                required_keywords.append(parameter.name)
        else:
            extra_kwargs = schema or True
    args: JsonSchema = {"type": "array", "items": extra_args}
    if positional:
        args["prefixItems"] = positional
    if leading_required:
        args["minItems"] = leading_required
    kwargs: JsonSchema = {"type": "object", "properties": keywords, "additionalProperties": extra_kwargs}
    if required_keywords:
        kwargs["required"] = required_keywords
    call: JsonSchema = {"$schema": DRAFT, "type": "object", "properties": {"args": args, "kwargs": kwargs}}
    # A required parameter passed neither positionally nor by keyword: when args stop before
    # its position, kwargs must name it.
    rules = [
        {"if": {"properties": {"args": {"maxItems": position}}},
         "then": {"properties": {"kwargs": {"required": [name]}}}}
        for position, name in either_required
    ]
    if rules:
        call["allOf"] = rules
    return call


def schema_of(hint: Any) -> JsonSchema:
    """The JSON Schema of values of the type `hint`; {} (any value) for what it does not know."""
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin is typing.Annotated:
        return schema_of(arguments[0])
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return {}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    if hint is None:
        return {"type": "null"}
    if origin is typing.Literal:
        return {"enum": list(arguments)}
    if origin is typing.Union or origin is types.UnionType:
        options = [schema_of(argument) for argument in arguments]
        return {} if any(not option for option in options) else {"anyOf": options}
    if origin is tuple:
        return _tuple_schema(arguments)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        return {"type": "array", "items": schema_of(arguments[0])} if arguments else {"type": "array"}
    if hint in _MAPPINGS or origin in _MAPPINGS:
        # JSON objects have text keys: only the values' type is checked.
        return {"type": "object", "additionalProperties": schema_of(arguments[1])} if len(arguments) == 2 else {
            "type": "object"}
    return {}


def _tuple_schema(arguments: tuple[Any, ...]) -> JsonSchema:
    if not arguments:
        return {"type": "array"}
    if len(arguments) == 2 and arguments[1] is Ellipsis:
        return {"type": "array", "items": schema_of(arguments[0])}
    count = len(arguments)
    return {"type": "array", "prefixItems": [schema_of(a) for a in arguments], "items": False, "minItems": count}
