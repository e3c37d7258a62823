"""The load a fault scenario submits, with every id chosen up front, and the workers' execution log.

Lone tasks run `fault_task`, chord members `fault_member` and chord callbacks `fault_callback`
(tests/e2e/workload.py); each appends one line per execution to the shared log, which `ExecutionLog` reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from conveyor import chord, sig
from conveyor.client import to_request
from conveyor.v1 import task_service_pb2
from tests.chaos.conftest import FAST_RECOVERY


@dataclass(frozen=True)
class Load:
    """The work every scenario submits and the timing knobs of the run."""

    tasks: int = 2000
    chords: int = 10
    members: int = 20
    task_seconds: float = 0.005
    batch: int = 50
    # The batches are sent at an even pace over this long (each batch is its own client call).
    submit_seconds: float = 10.0
    workers: int = 2
    concurrency: int = 8
    # After the fault ended and the load is in: how long to wait for every accepted id to be terminal.
    stuck_after_seconds: float = 30.0
    # Before counting executions: late duplicates (a callback fired twice) show up here.
    settle_seconds: float = 3.0
    submit_give_up_seconds: float = 30.0
    call_timeout_seconds: float = 10.0

    def describe(self) -> str:
        return (f"{self.tasks} tasks ({self.task_seconds * 1000:.0f} ms) + {self.chords} chords x {self.members} "
                f"members in batches of {self.batch} over {self.submit_seconds:.0f} s; {self.workers} workers x "
                f"{self.concurrency}; stuck after {self.stuck_after_seconds:.0f} s, settle {self.settle_seconds:.0f} s;"
                f" server env {FAST_RECOVERY}")


# -- the plan: every id chosen up front ------------------------------------------------------------------

@dataclass(frozen=True)
class ChordIds:
    members: tuple[str, ...]
    callback: str


@dataclass
class Batch:
    """One SubmitBatch call: lone tasks, or one chord."""

    index: int
    request: task_service_pb2.SubmitBatchRequest
    task_ids: list[str] = field(default_factory=list)
    chord: ChordIds | None = None

    @property
    def ids(self) -> list[str]:
        if self.chord is None:
            return list(self.task_ids)
        return [*self.chord.members, self.chord.callback]


def build_plan(load: Load, queue: str, run_id: str) -> list[Batch]:
    """Lone-task batches with the chords spread evenly among them, in submission order."""
    task_batches: list[Batch] = []
    for start in range(0, load.tasks, load.batch):
        ids = [f"t-{run_id}-{i}" for i in range(start, min(start + load.batch, load.tasks))]
        sigs = [sig("fault_task", int(i.rsplit("-", 1)[1]), load.task_seconds).set(id=i, queue=queue) for i in ids]
        request = task_service_pb2.SubmitBatchRequest(requests=[to_request(s) for s in sigs])
        task_batches.append(Batch(0, request, task_ids=ids))
    chord_batches: list[Batch] = []
    for c in range(load.chords):
        chord_ids = ChordIds(tuple(f"m-{run_id}-{c}-{k}" for k in range(load.members)), f"cb-{run_id}-{c}")
        members = [sig("fault_member", k, load.task_seconds).set(id=m, queue=queue)
                   for k, m in enumerate(chord_ids.members)]
        workflow = chord(members, sig("fault_callback").set(id=chord_ids.callback, queue=queue))
        request = task_service_pb2.SubmitBatchRequest(requests=[to_request(workflow)])
        chord_batches.append(Batch(0, request, chord=chord_ids))
    ordered: list[Batch] = []
    every = max(len(task_batches) // (len(chord_batches) + 1), 1)
    pending_chords = iter(chord_batches)
    for position, batch in enumerate(task_batches, start=1):
        ordered.append(batch)
        if position % every == 0:
            ordered.extend(itertools.islice(pending_chords, 1))
    ordered.extend(pending_chords)
    for index, batch in enumerate(ordered):
        batch.index = index
    return ordered


# -- the execution log -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Execution:
    kind: str  # task, member or callback
    task_id: str
    attempt: int
    pid: int
    at: float


class ExecutionLog:
    """Reads the workers' shared CONVEYOR_TEST_LOG incrementally (only complete lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[Execution] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[Execution]:
        if not self.path.exists():
            return self.runs
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            parts = raw.decode(errors="replace").split(" ")
            if len(parts) == 6 and parts[0] == "fault":
                fields = dict(p.split("=", 1) for p in parts[3:])
                self.runs.append(Execution(parts[1], parts[2], int(fields["attempt"]), int(fields["pid"]),
                                           float(fields["at"])))
        return self.runs

    def count(self, kind: str | None = None) -> int:
        return sum(1 for run in self.refresh() if kind is None or run.kind == kind)

    def by_task(self) -> dict[str, list[Execution]]:
        grouped: dict[str, list[Execution]] = {}
        for run in self.refresh():
            grouped.setdefault(run.task_id, []).append(run)
        return grouped
