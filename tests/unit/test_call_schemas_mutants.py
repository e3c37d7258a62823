"""core/call_schemas.py: the limits a declared TaskInfo is held to and the refusals that name
them, how a long mismatch message is cut, a mismatch of the call itself or of the whole args
list when a previous result leads, and the refusal of JSON that nests too deeply."""

from __future__ import annotations

import json

import pytest

from conveyor.v1 import task_pb2
from conveyor.values import to_values
from conveyor_server.core.call_schemas import (
    MAX_DESCRIPTION_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_SCHEMA_BYTES,
    BadJson,
    BadSchema,
    call_of,
    check_task_info,
    compiled,
    field_name,
    mismatch,
    parse_json,
)

WHERE = "hello.tasks[0]"
INTEGER_KWARG = json.dumps({"properties": {"kwargs": {"properties": {"x": {"type": "integer"}}}}})
# The message jsonschema writes for a string where an integer is due: "'<text>' is not of type 'integer'".
TYPE_MESSAGE_OVERHEAD = len("'' is not of type 'integer'")


def kwarg_problem(text: str) -> str | None:
    call = call_of(task_pb2.Signature(name="t", kwargs={"x": task_pb2.Value(string_value=text)}), leading=False)
    return mismatch(compiled(INTEGER_KWARG), call, leading=False)


def schema_of_size(size: int) -> str:
    """A valid call schema of exactly `size` bytes."""
    empty = json.dumps({"description": ""})
    return json.dumps({"description": "x" * (size - len(empty))})


def test_a_mismatch_message_of_exactly_the_limit_is_kept_whole() -> None:
    text = "a" * (MAX_MESSAGE_CHARS - TYPE_MESSAGE_OVERHEAD)
    message = f"'{text}' is not of type 'integer'"
    assert len(message) == MAX_MESSAGE_CHARS
    assert kwarg_problem(text) == f"kwargs['x']: {message}"


def test_a_longer_mismatch_message_is_cut_to_the_limit_with_an_ellipsis() -> None:
    text = "a" * (MAX_MESSAGE_CHARS - TYPE_MESSAGE_OVERHEAD + 1)
    problem = kwarg_problem(text)
    assert problem == f"kwargs['x']: '{text}' is not of type 'intege…"
    assert len(problem.removeprefix("kwargs['x']: ")) == MAX_MESSAGE_CHARS


def test_a_description_of_exactly_the_limit_is_kept_and_a_longer_one_refused_by_name() -> None:
    check_task_info(task_pb2.TaskInfo(name="t", description="d" * MAX_DESCRIPTION_CHARS), WHERE)
    with pytest.raises(BadSchema) as refused:
        check_task_info(task_pb2.TaskInfo(name="t", description="d" * (MAX_DESCRIPTION_CHARS + 1)), WHERE)
    assert str(refused.value) == "hello.tasks[0].description is longer than 1000 characters"


def test_a_call_schema_of_exactly_the_limit_is_kept_and_a_larger_one_refused_in_kib() -> None:
    check_task_info(task_pb2.TaskInfo(name="t", call_schema=schema_of_size(MAX_SCHEMA_BYTES)), WHERE)
    with pytest.raises(BadSchema) as refused:
        check_task_info(task_pb2.TaskInfo(name="t", call_schema=schema_of_size(MAX_SCHEMA_BYTES + 1)), WHERE)
    assert str(refused.value) == "hello.tasks[0].call_schema is larger than 64 KiB"


def test_a_mismatch_of_the_call_itself_is_named_call() -> None:
    call = call_of(task_pb2.Signature(name="t"), leading=False)
    assert mismatch(compiled(json.dumps({"required": ["other"]})), call, leading=False) == (
        "call: 'other' is a required property"
    )
    assert field_name([]) == "call"


def test_a_mismatch_of_the_whole_args_list_is_named_args_when_a_previous_result_leads() -> None:
    schema = compiled(json.dumps({"properties": {"args": {"maxItems": 1}}}))
    call = call_of(task_pb2.Signature(name="t", args=to_values([1])), leading=True)
    assert mismatch(schema, call, leading=True) == "args: [None, 1] is too long"


def test_json_that_nests_too_deeply_is_refused_as_such() -> None:
    with pytest.raises(BadJson) as refused:
        parse_json("[" * 100_000 + "]" * 100_000)
    assert str(refused.value) == "it nests too deeply"
