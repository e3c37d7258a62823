"""Process figures from /proc (Linux): resident memory and CPU time of a process tree."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in parents.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU seconds of `pid` (and, with `tree`, of its live descendants)."""
    total = 0.0
    for each in [pid, *(children(pid) if tree else [])]:
        try:
            fields = _stat_fields(each)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def status_kib(pid: int, field: str) -> int:
    """A kB figure from /proc/PID/status, e.g. VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its live descendants, in KiB (shared pages counted per process)."""
    total = 0
    for each in [pid, *children(pid)]:
        try:
            total += status_kib(each, "VmRSS")
        except (OSError, KeyError):
            continue
    return total
