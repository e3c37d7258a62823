"""The result row of one fault scenario, and how it is counted from final states and the execution log.

- submitted: ids the client was told were accepted (OK, or ALREADY_EXISTS on a retry); refused: ids whose
  submit was given up after retrying.
- succeeded: accepted ids that ended in their expected state (SUCCESS; CANCELLED for cancel targets) and, for
  SUCCESS, ran at least once.
- lost: accepted ids that are gone (NOT_FOUND), ended in the wrong terminal state, or ended SUCCESS without
  ever running.
- stuck: accepted ids still not terminal after the bounded wait.
- dup: executions beyond the first, over all ids (at-least-once allows them; listed, not failed).
- callbacks: chord callbacks that ran / chords accepted. cb_extra: callback executions beyond the first that
  are not explained by the test killing the worker that ran the one before (a SIGKILL mid-callback must re-run
  it: a redelivery, not a second firing).
- cancel / late (cancel scenario): targets that ended CANCELLED / targets that started after their Cancel
  returned.
- recover_s: seconds from the end of the fault until every accepted id was terminal ("-": never).
- resume_s: seconds from the end of the fault (an engine's return) to the first execution that started after
  it ("-": nothing ran after it, the load had run by then). Executions are logged as they start and the load's
  tasks last 5 ms, so this is the next task's completion within a few ms.
- client_errors: the status codes the client's calls got, by call (a transient one is retried with the same
  ids); an engine outage must show as UNAVAILABLE, never UNKNOWN.

`format_engine_table` prints the rows as the engine x outage table of bench/faults.py.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.load import Batch, ChordIds, Execution

NOT_FOUND = "NOT_FOUND"
UNREAD = "UNREAD"
TERMINAL_NAMES = frozenset({"SUCCESS", "FAILURE", "CANCELLED"})


@dataclass
class Row:
    scenario: str
    # For the engine x outage table: which engine the fault hit (and how the others were set up), and how.
    engine: str = ""
    outage: str = ""
    submitted: int = 0
    refused: int = 0
    succeeded: int = 0
    lost: int = 0
    stuck: int = 0
    duplicates: int = 0
    callbacks_fired: int = 0
    callbacks_expected: int = 0
    callback_extra: int = 0
    # Chord callbacks that ran exactly once (a re-run explained by a killed worker counts as once).
    callbacks_once: int = 0
    recover_seconds: float | None = None
    resume_seconds: float | None = None
    client_errors: Counter[str] = field(default_factory=Counter)
    wall_seconds: float = 0.0
    cancelled: int = 0
    started_after_cancel: int = 0
    # The URL schemes of the engines the servers ran on (e.g. {"sqlite"}), as started, not as labelled.
    server_engines: set[str] = field(default_factory=set)
    # Set when the fault could not be injected (its trigger never came): the run proves nothing.
    fault_error: str = ""
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    HEADER = (f"{'scenario':<16} {'submitted':>9} {'refused':>7} {'succeeded':>9} {'lost':>5} {'stuck':>5} "
              f"{'dup':>5} {'callbacks':>9} {'cb_extra':>8} {'cancel':>6} {'late':>5} {'recover_s':>9} {'wall_s':>6}")

    def line(self) -> str:
        recover = "-" if self.recover_seconds is None else f"{self.recover_seconds:.1f}"
        callbacks = f"{self.callbacks_fired}/{self.callbacks_expected}"
        return (f"{self.scenario:<16} {self.submitted:>9} {self.refused:>7} {self.succeeded:>9} {self.lost:>5} "
                f"{self.stuck:>5} {self.duplicates:>5} {callbacks:>9} {self.callback_extra:>8} {self.cancelled:>6} "
                f"{self.started_after_cancel:>5} {recover:>9} {self.wall_seconds:>6.1f}")

    def unexpected_client_errors(self) -> dict[str, int]:
        """Client call failures other than UNAVAILABLE (keys like "submit DEADLINE_EXCEEDED")."""
        return {call: n for call, n in self.client_errors.items() if not call.endswith(" UNAVAILABLE")}

    @property
    def ok(self) -> bool:
        return (not self.fault_error and self.submitted > 0 and self.refused == 0 and self.lost == 0 and self.stuck == 0
                and self.callbacks_fired == self.callbacks_expected and self.callback_extra == 0
                and self.started_after_cancel == 0)

    def report(self) -> str:
        lines = [Row.HEADER, self.line()]
        if self.fault_error:
            lines.append(f"  FAULT NOT INJECTED: {self.fault_error}")
        if self.resume_seconds is not None:
            lines.append(f"  resumed {self.resume_seconds:.2f} s after the fault ended")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  {kind} ({len(items)}): {items[:12]}" for kind, items in self.problems.items()]
        return "\n".join(lines)


def format_table(rows: Sequence[Row]) -> str:
    return "\n".join([Row.HEADER, *(r.line() for r in rows)])


ENGINE_COLUMNS = ("engine", "outage", "submitted", "succeeded", "lost", "stuck", "duplicated", "callbacks once",
                  "time to resume")


def format_engine_table(rows: Sequence[Row]) -> str:
    """The engine x outage table: one line per row, columns sized to their contents."""
    cells = [ENGINE_COLUMNS] + [
        (r.engine or r.scenario, r.outage or "-", str(r.submitted), str(r.succeeded), str(r.lost), str(r.stuck),
         str(r.duplicates), f"{r.callbacks_once}/{r.callbacks_expected}",
         "-" if r.resume_seconds is None else f"{r.resume_seconds:.2f} s")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(ENGINE_COLUMNS))]

    def aligned(line: tuple[str, ...]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        padded = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return "\n".join(aligned(line) for line in cells)


@dataclass
class Evidence:
    """What a run left behind, for counting."""

    accepted: Sequence[str]
    refused: Mapping[str, str]  # id -> why its submit was given up
    accepted_how: Mapping[str, str]  # id -> how its submit was answered
    final: Mapping[str, str]  # id -> final state name, NOT_FOUND or UNREAD
    runs: Mapping[str, list[Execution]]  # id -> its executions
    chords: Sequence[ChordIds]
    killed_worker_pids: set[int]
    cancelled_at: Mapping[str, float] = field(default_factory=dict)  # id -> wall time its Cancel returned
    cancel_errors: Mapping[str, str] = field(default_factory=dict)

    def raced_cancels(self) -> set[str]:
        """Cancel targets that had started before their Cancel returned: either outcome is right."""
        return {t for t, at in self.cancelled_at.items() if any(e.at <= at for e in self.runs.get(t, []))}

    def expected(self, task_id: str) -> str:
        return "CANCELLED" if task_id in self.cancelled_at else "SUCCESS"


def count(row: Row, evidence: Evidence) -> Row:
    row.submitted = len(evidence.accepted)
    row.refused = len(evidence.refused)
    if evidence.refused:
        reasons = Counter(evidence.refused.values())
        row.problems["refused (submit given up)"] = [f"{k} x{v}" for k, v in reasons.items()]
    _count_states(row, evidence)
    _count_duplicates(row, evidence)
    _count_callbacks(row, evidence)
    if evidence.cancelled_at or evidence.cancel_errors:
        _count_cancels(row, evidence)
    _trace_bad_ids(row, evidence)
    return row


def _count_states(row: Row, evidence: Evidence) -> None:
    raced = evidence.raced_cancels()
    for task_id in evidence.accepted:
        want, got = evidence.expected(task_id), evidence.final.get(task_id, UNREAD)
        ran = len(evidence.runs.get(task_id, []))
        # A cancel target that started before its Cancel returned may end either way.
        either = task_id in raced and got in {"SUCCESS", "CANCELLED"}
        if either or (got == want and (want != "SUCCESS" or ran)):
            row.succeeded += 1
        elif got == want:
            row.lost += 1
            row.problems.setdefault("lost: SUCCESS but never executed", []).append(task_id)
        elif got in TERMINAL_NAMES or got == NOT_FOUND:
            row.lost += 1
            row.problems.setdefault(f"lost: ended {got}, expected {want}", []).append(task_id)
        else:
            row.stuck += 1
            row.problems.setdefault(f"stuck: {got}", []).append(f"{task_id} (ran {ran}x)")


def _count_duplicates(row: Row, evidence: Evidence) -> None:
    extra = {t: len(r) - 1 for t, r in evidence.runs.items() if len(r) > 1}
    row.duplicates = sum(extra.values())
    if extra:
        row.problems["duplicated executions (allowed)"] = [f"{t} x{n + 1}" for t, n in sorted(extra.items())]
    strays = sorted(set(evidence.runs) - set(evidence.accepted))
    if strays:
        row.problems["info: executed but never accepted"] = strays


def _count_callbacks(row: Row, evidence: Evidence) -> None:
    accepted = set(evidence.accepted)
    chords = [c for c in evidence.chords if c.callback in accepted]
    row.callbacks_expected = len(chords)
    for ids in chords:
        runs = sorted(evidence.runs.get(ids.callback, []), key=lambda e: e.at)
        if not runs:
            row.problems.setdefault("violation: callback never executed", []).append(ids.callback)
            continue
        row.callbacks_fired += 1
        unexplained = [later for earlier, later in itertools.pairwise(runs)
                       if earlier.pid not in evidence.killed_worker_pids]
        row.callbacks_once += not unexplained
        detail = f"{ids.callback}: " + ", ".join(f"attempt={e.attempt} pid={e.pid} at={e.at:.3f}" for e in runs)
        if unexplained:
            row.callback_extra += len(unexplained)
            row.problems.setdefault("violation: callback executed more than once", []).append(detail)
        elif len(runs) > 1:
            row.problems.setdefault("info: callback re-ran after the test killed its worker", []).append(detail)


def _count_cancels(row: Row, evidence: Evidence) -> None:
    row.cancelled = sum(1 for t in evidence.cancelled_at if evidence.final.get(t) == "CANCELLED")
    late: dict[str, list[Execution]] = {}
    for task_id, at in evidence.cancelled_at.items():
        if after := [e for e in evidence.runs.get(task_id, []) if e.at > at]:
            late[task_id] = after
    row.started_after_cancel = len(late)
    if late:
        row.problems["violation: started after its cancel returned"] = [
            f"{t} +{runs[0].at - evidence.cancelled_at[t]:.3f}s pid={runs[0].pid} ended {evidence.final.get(t)}"
            for t, runs in sorted(late.items())]
    if raced := evidence.raced_cancels():
        row.notes.append(f"{len(raced)} cancel targets had started before the cancel returned (either outcome ok)")
    if evidence.cancel_errors:
        row.problems["info: cancel call failed"] = [f"{t}: {e}" for t, e in evidence.cancel_errors.items()]


def _trace_bad_ids(row: Row, evidence: Evidence) -> None:
    """For ids not in their expected state: their state and how their submit was answered, in one note."""
    raced = evidence.raced_cancels()
    bad = Counter(
        f"{evidence.final.get(t)} after submit {evidence.accepted_how.get(t)}"
        for t in evidence.accepted if evidence.final.get(t) != evidence.expected(t) and t not in raced
    )
    if bad:
        row.notes.append(f"ids not in their expected state, by state and submit answer: {dict(bad)}")


def write_outcomes(path: Path, plan: Sequence[Batch], evidence: Evidence) -> None:
    """One CSV row per planned id: batch, how its submit was answered, final state, executions (pid@time)."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["task_id", "batch", "submit", "final", "expected", "runs", "cancel_returned_at"])
        for batch in plan:
            for task_id in batch.ids:
                submit = evidence.accepted_how.get(task_id) or evidence.refused.get(task_id, "not sent")
                runs = " ".join(f"{e.pid}@{e.at:.3f}" for e in evidence.runs.get(task_id, []))
                cancelled = evidence.cancelled_at.get(task_id)
                writer.writerow([task_id, batch.index, submit, evidence.final.get(task_id, ""),
                                 evidence.expected(task_id), runs, f"{cancelled:.3f}" if cancelled else ""])
