"""Converts Python values to and from the wire `Value`.

Scalars are lossless (int64, float, str, bool, bytes); lists, dicts and None travel as JSON
text so that any language can read them without a codec library.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.errors import UnencodableValue
from conveyor.v1 import task_pb2

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def to_value(obj: Any) -> task_pb2.Value:
    """Encode one Python value. bool is checked before int (bool is an int subclass)."""
    if isinstance(obj, bool):
        return task_pb2.Value(bool_value=obj)
    if isinstance(obj, int):
        if INT64_MIN <= obj <= INT64_MAX:
            return task_pb2.Value(int_value=obj)
        raise UnencodableValue(f"integer {obj} does not fit in int64")
    if isinstance(obj, float):
        return task_pb2.Value(double_value=obj)
    if isinstance(obj, str):
        return task_pb2.Value(string_value=obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return task_pb2.Value(bytes_value=bytes(obj))
    if obj is None:
        return task_pb2.Value()
    try:
        return task_pb2.Value(json_value=json.dumps(obj, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise UnencodableValue(f"cannot encode {type(obj).__name__} as a task value: {exc}") from exc


def from_value(value: task_pb2.Value) -> Any:
    """Decode one wire value; an empty value is None."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_value":
        return json.loads(value.json_value)
    return getattr(value, kind)


def to_values(objs: Iterable[Any]) -> list[task_pb2.Value]:
    return [to_value(obj) for obj in objs]


def to_value_map(objs: Mapping[str, Any]) -> dict[str, task_pb2.Value]:
    return {key: to_value(obj) for key, obj in objs.items()}


def to_jsonable(value: task_pb2.Value) -> Any:
    """A JSON-compatible form of a value, for places that must build one JSON document
    (a chord's list of member results). bytes become {"$bytes": base64}."""
    kind = value.WhichOneof("kind")
    if kind == "bytes_value":
        return {"$bytes": base64.b64encode(value.bytes_value).decode("ascii")}
    return from_value(value)


def timestamp_now() -> Timestamp:
    """The current time as a Timestamp; cheaper than Timestamp.GetCurrentTime(), which goes
    through datetime and shows up in profiles of the task hot path."""
    ns = time.time_ns()
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def seconds_of(value: Duration | Timestamp) -> float:
    """A Duration's length, or a Timestamp's Unix time, in seconds."""
    return value.seconds + value.nanos / 1e9


def micros_of(stamp: Timestamp) -> int:
    """A Timestamp's Unix time in whole microseconds (the unit task listings and page tokens order by)."""
    return stamp.seconds * 1_000_000 + stamp.nanos // 1_000


def set_seconds(value: Duration | Timestamp, seconds: float) -> None:
    """Sets a Duration's length, or a Timestamp's Unix time, to `seconds` (truncated to the nanosecond)."""
    value.FromNanoseconds(int(seconds * 1e9))
