"""bench/phases.py: the steps it wraps still exist in the server, and its table reads the notes right."""

from __future__ import annotations

import inspect
from pathlib import Path

from bench.phases import WRAPPED, phases, targets


def test_every_step_it_wraps_names_a_function_of_the_server() -> None:
    found = targets()
    assert len(found) == len(WRAPPED)
    for (owner, method, function), (*_, name) in zip(found, WRAPPED, strict=True):
        assert callable(function), f"{owner}.{method} ({name}) is not a function"
    # The steps with a beginning and an end are coroutines; the assignment is a plain send.
    kinds = {name: inspect.iscoroutinefunction(function) for (_, _, function), (*_, name) in zip(found, WRAPPED,
                                                                                                  strict=True)}
    assert kinds["Submit"] and kinds["record write"] and kinds["broker ack"]
    assert not kinds["message to the worker"]


def test_the_table_is_the_median_offset_of_each_note_from_its_tasks_submit(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    lines = []
    # A warm-up task, then three measured ones; the third sends the worker a second message.
    for start, publish_end, extra in [(0, 999_000, False), (10_000_000, 10_400_000, False),
                                      (20_000_000, 20_600_000, False), (30_000_000, 30_900_000, True)]:
        lines += [f"{start} Submit>", f"{publish_end} broker publish<", f"{start + 2_000_000} message to the worker"]
        if extra:
            lines.append(f"{start + 3_000_000} message to the worker")
    notes.write_text("\n".join(lines) + "\n")

    rows = phases(notes, skip=1, count=3)

    assert rows == [("Submit>", 0.0, 3), ("broker publish<", 600.0, 3), ("message to the worker", 2000.0, 3)]
