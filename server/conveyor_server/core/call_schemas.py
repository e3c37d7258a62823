"""JSON Schemas of task calls (TaskInfo.call_schema): checked once when a worker declares one,
compiled once per distinct schema, and matched against a Signature's args and kwargs with the
first mismatch described by its field ("args[1]: 'abc' is not of type 'integer'").

The checking is the `jsonschema` library's (draft 2020-12 by default, or the draft a schema
names in "$schema"), with one change: "integer" means an int64 Value, never a double, as the
wire keeps the two apart (plain JSON Schema counts 1.0 as an integer).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator, TypeChecker, validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.protocols import Validator

from conveyor.v1 import task_pb2

log = logging.getLogger(__name__)
# Largest call_schema a worker may declare; a whole Hello stays far below the message limit.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_DESCRIPTION_CHARS = 1_000
# Distinct schemas kept compiled: far more than the tasks of a deployment.
COMPILED_CACHE_SIZE = 1_024
# A mismatch message quotes the value; a long one is cut so the field stays readable.
MAX_MESSAGE_CHARS = 300


class BadSchema(ValueError):
    """A declared call schema is not JSON or not a valid JSON Schema."""


class BadJson(ValueError):
    """A json_value that is not valid JSON."""


def _is_int64(checker: TypeChecker, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _strict_integers(cls: type[Validator]) -> type[Validator]:
    checker = cls.TYPE_CHECKER.redefine("integer", _is_int64)
    # `extend` is untyped in types-jsonschema.
    extended: type[Validator] = validators.extend(cls, type_checker=checker)  # type: ignore[no-untyped-call]
    return extended


@functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)
def compiled(text: str) -> Validator:
    """The validator of a call schema; BadSchema when it is not one."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadSchema(f"is not JSON ({exc})") from None
    if not isinstance(schema, dict | bool):
        raise BadSchema(f"must be a JSON object (or true or false), not {type(schema).__name__}")
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        if isinstance(schema, dict):  # true and false are schemas of their own
            cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise BadSchema(f"is not a valid JSON Schema ({where + ': ' if where else ''}{_cut(exc.message)})") from None
    return _strict_integers(cls)(schema)


def check_task_info(info: task_pb2.TaskInfo, where: str) -> None:
    """Raise BadSchema (naming `where`) unless `info` is one the registry can keep."""
    if not info.name:
        raise BadSchema(f"{where}.name is empty")
    if len(info.description) > MAX_DESCRIPTION_CHARS:
        raise BadSchema(f"{where}.description is longer than {MAX_DESCRIPTION_CHARS} characters")
    if len(info.call_schema.encode()) > MAX_SCHEMA_BYTES:
        raise BadSchema(f"{where}.call_schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    if info.call_schema:
        try:
            compiled(info.call_schema)
        except BadSchema as exc:
            raise BadSchema(f"{where}.call_schema {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for all: json.loads with an option builds a new one per call, 30 times slower.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_json(text: str) -> Any:
    """Decode a json_value as strict JSON (no NaN or Infinity); BadJson when it is not."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise BadJson("it nests too deeply") from None
    except ValueError as exc:
        raise BadJson(str(exc)) from None


def json_of(value: task_pb2.Value) -> Any:
    """A Value as the JSON a call schema sees (bytes as base64 text)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_value":
        return parse_json(value.json_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind)


def call_of(signature: task_pb2.Signature, leading: bool) -> dict[str, Any]:
    """The object a call schema describes. `leading`: the task receives a previous result as its
    first arg, unknown at submit; a null stands in for it and is not checked (see mismatch)."""
    args = [json_of(value) for value in signature.args]
    if leading:
        args.insert(0, None)
    return {"args": args, "kwargs": {key: json_of(value) for key, value in signature.kwargs.items()}}


def mismatch(validator: Validator, call: dict[str, Any], leading: bool) -> str | None:
    """The first way `call` breaks the schema, as "<field>: <what>"; None when it matches."""
    try:
        errors = [error for error in validator.iter_errors(call) if not (leading and _at_first_arg(error))]
    except Exception as exc:  # an unresolvable $ref, say: the worker's schema is at fault, not the call
        log.warning("a registered call schema cannot be checked (%s: %s); accepting the call",
                    type(exc).__name__, exc)
        return None
    if not errors:
        return None
    error = best_match(errors)
    path = list(error.absolute_path)
    if leading and path[:1] == ["args"] and len(path) > 1 and isinstance(path[1], int):
        path[1] -= 1  # named as submitted, without the previous result in front
    return f"{field_name(path)}: {_cut(error.message)}"


def _at_first_arg(error: ValidationError) -> bool:
    return list(error.absolute_path)[:2] == ["args", 0]


def field_name(path: Iterable[str | int]) -> str:
    """args[1], kwargs['y'], args[0]['items'][2]; "call" for the call itself."""
    parts = list(path)
    if not parts:
        return "call"
    head, rest = str(parts[0]), parts[1:]
    return head + "".join(f"[{part}]" if isinstance(part, int) else f"[{part!r}]" for part in rest)


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
