"""The stored form of a schedule: a `ScheduleRecord` (conveyor.internal.v1).

Records written before it existed are a JSON envelope around the base64 of the Schedule; they
are still read (a serialized ScheduleRecord never starts with "{": that byte would open a
group in field 15), and every write stores the new form, so each is converted the next time
a replica rewrites it (at the latest one keepalive interval later).
"""

from __future__ import annotations

import base64
import binascii
import json

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2
from conveyor.values import seconds_of, set_seconds

ScheduleRecord = records_pb2.ScheduleRecord


def live(schedule: admin_service_pb2.Schedule, touched: float) -> ScheduleRecord:
    record = ScheduleRecord(schedule=schedule)
    set_seconds(record.touched_at, touched)
    return record


def tombstone(touched: float) -> ScheduleRecord:
    record = ScheduleRecord(deleted=True)
    set_seconds(record.touched_at, touched)
    return record


def touched(record: ScheduleRecord) -> float:
    """When a replica last wrote the record (the epoch when it does not say)."""
    return seconds_of(record.touched_at)


def parse(data: bytes) -> ScheduleRecord:
    """A stored record, in either form; ValueError (or DecodeError) when it is unreadable."""
    if data.startswith(b"{"):
        return _from_envelope(data)
    return ScheduleRecord.FromString(data)


def _from_envelope(data: bytes) -> ScheduleRecord:
    envelope = json.loads(data)  # an object: the data starts with "{"
    when = float(envelope.get("touched", 0.0))
    if envelope.get("deleted"):
        return tombstone(when)
    try:
        serialized = base64.b64decode(envelope["schedule"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"a schedule envelope without a readable schedule: {exc}") from exc
    return live(admin_service_pb2.Schedule.FromString(serialized), when)
