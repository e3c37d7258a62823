"""Where a lone task's time goes inside the server: `python bench/latency.py --phases`.

The bench starts the server with `bench/phases_hook` on its PYTHONPATH; that directory's
sitecustomize calls `install()` in the `conveyor serve` process only. `install()` wraps the
server's steps on a task's path (the Submit, its record insert and broker publish, the fetch
that takes the task and its look at the queue, the claim's record read, the assignment, the
worker's result, its record write and broker ack, the GetResult) so that each notes when it
began and ended, and writes the notes to a file when the server exits. `phases()` reads them
back: for a run of sequential tasks, the median offset of each note from its task's Submit.

A bench tool, not a trace: it wraps the server's methods by name. A renamed one makes the
install fail (Python reports the error in sitecustomize and starts the server unwrapped), so no
notes are written and `phases()` says so; tests/unit/test_bench_phases.py catches a rename first.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

# Where each note comes from: module, class ("": a function of the module, looked up there when
# called), method, the note's name. A coroutine notes "name>" as it begins and "name<" as it
# ends; a plain function notes "name" when called.
WRAPPED: tuple[tuple[str, str, str, str], ...] = (
    ("conveyor_server.api.task_service", "TaskServicer", "_submit", "Submit"),
    ("conveyor_server.core.store", "TaskStore", "create", "record insert"),
    ("conveyor_server.core.publisher", "Publisher", "publish", "broker publish"),
    # Redis's: bench/latency.py runs on Redis. A fetch waits for work, so the one that takes a
    # task began before it (the next one begins after the claim).
    ("conveyor_server.brokers.redis", "RedisBroker", "fetch", "broker fetch"),
    # The look at the queue (the engine call) of a fetch woken by the publish.
    ("conveyor_server.brokers._wakeups", "Wakeups", "look", "broker look"),
    ("conveyor_server.core.dispatch", "Dispatcher", "claim", "claim"),
    ("conveyor_server.core.dispatch", "Dispatcher", "_read", "claim's record read"),
    ("conveyor_server.core.sessions", "WorkerSession", "send", "message to the worker"),
    ("conveyor_server.core.connection", "WorkerConnections", "_results", "result from the worker"),
    ("conveyor_server.core.store", "TaskStore", "update_loaded", "record write"),
    ("conveyor_server.core.connection", "", "settle", "broker ack"),
    ("conveyor_server.api.task_service", "TaskServicer", "_get_result", "GetResult"),
)
# The note each task's notes are measured from.
FIRST = "Submit>"


def install(output: Path, clock: Callable[[], int] = time.perf_counter_ns) -> None:
    """Wrap the steps of WRAPPED; their notes go to `output` when the process exits."""
    notes: list[tuple[int, str]] = []
    for (owner, method, function), (*_, name) in zip(targets(), WRAPPED, strict=True):
        setattr(owner, method, _noting(function, name, notes, clock))

    def write() -> None:
        output.write_text("".join(f"{at} {name}\n" for at, name in notes))

    atexit.register(write)


def targets() -> list[tuple[Any, str, Callable[..., Any]]]:
    """(owner, attribute, function) of each step of WRAPPED; AttributeError for a step renamed."""
    found = []
    for module_name, class_name, method, _ in WRAPPED:
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        found.append((owner, method, getattr(owner, method)))
    return found


def _noting(
    method: Callable[..., Any], name: str, notes: list[tuple[int, str]], clock: Callable[[], int]
) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):
        async def noted_coroutine(*args: Any, **kwargs: Any) -> Any:
            notes.append((clock(), f"{name}>"))
            try:
                coroutine: Coroutine[Any, Any, Any] = method(*args, **kwargs)
                return await coroutine
            finally:
                notes.append((clock(), f"{name}<"))

        return functools.wraps(method)(noted_coroutine)

    def noted(*args: Any, **kwargs: Any) -> Any:
        notes.append((clock(), name))
        return method(*args, **kwargs)

    return functools.wraps(method)(noted)


def phases(notes_file: Path, skip: int, count: int) -> list[tuple[str, float, int]]:
    """(note, median µs after its task's Submit began, tasks that had it) for `count` tasks of
    a sequential run, after the first `skip` Submits, in order of the medians. A note that comes
    more than once in a task is numbered: "message to the worker #2"."""
    if not notes_file.exists():
        raise RuntimeError(f"the server wrote no notes to {notes_file}: see its log (a wrapped step renamed?)")
    tasks: list[list[tuple[int, str]]] = []
    for line in notes_file.read_text().splitlines():
        stamp, name = line.split(" ", 1)
        if name == FIRST:
            tasks.append([])
        if tasks:
            tasks[-1].append((int(stamp), name))
    chosen = tasks[skip:skip + count]
    offsets: dict[str, list[float]] = defaultdict(list)
    for task in chosen:
        start = task[0][0]
        seen: dict[str, int] = defaultdict(int)
        for at, name in task:
            seen[name] += 1
            label = name if seen[name] == 1 else f"{name} #{seen[name]}"
            offsets[label].append((at - start) / 1e3)
    # A note that most tasks lack (a background write that fell in a few) would only blur the table.
    rows = [(label, statistics.median(values), len(values)) for label, values in offsets.items()
            if 2 * len(values) >= len(chosen)]
    return sorted(rows, key=lambda row: row[1])
