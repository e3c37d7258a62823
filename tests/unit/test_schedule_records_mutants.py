"""core/schedule_records.py: a legacy JSON envelope keeps the time a replica last wrote it (its
"touched" stamp), and one without a stamp reads as written at the epoch, live or deleted."""

from __future__ import annotations

import base64
import json

from conveyor.v1 import admin_service_pb2
from conveyor_server.core.schedule_records import parse, touched

T0 = 1_700_000_000.5  # exact in a float and in a Timestamp


def legacy(touched_at: float | None = None, deleted: bool = False) -> bytes:
    stored: dict[str, object] = {"deleted": True} if deleted else {
        "schedule": base64.b64encode(admin_service_pb2.Schedule(name="tick").SerializeToString()).decode()
    }
    if touched_at is not None:
        stored["touched"] = touched_at
    return json.dumps(stored).encode()


def test_a_legacy_envelope_keeps_its_touched_stamp() -> None:
    live = parse(legacy(T0))
    assert (live.schedule.name, touched(live)) == ("tick", T0)
    assert touched(parse(legacy(T0, deleted=True))) == T0


def test_a_legacy_envelope_without_a_touched_stamp_reads_as_touched_at_the_epoch() -> None:
    live = parse(legacy())
    assert (live.schedule.name, touched(live)) == ("tick", 0.0)
    assert touched(parse(legacy(deleted=True))) == 0.0
