"""Where a process's CPU went, by native library and by thread, from a Linux perf recording.

    apt-get install linux-perf
    python bench/latency.py --profile /tmp/server.data      # a .data output records with perf
    python bench/perf_summary.py /tmp/server.data

py-spy (bench/profile_summary.py) shows which Python code runs, but its native mode also counts
the event loop's waits: on a lone task it put 64% of the server in libc, most of it epoll waits
and getpid. perf samples the CPU clock, so only time on a CPU counts, and it sees the kernel's
share of it (system calls, loopback TCP, context switches) and every thread, gRPC's own
included. The libraries are grouped by what they do: the Python interpreter (Conveyor's code,
redis-py's, asyncio's, all run there), gRPC core, protobuf, the event loop, the kernel.

With the cpu-clock event (a VM has no hardware counters), time spent with interrupts off is
counted where they are turned back on: the kernel's top symbols name a scheduler switch or a
wake-up rather than the code that ran before.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

# What a shared object does, by a piece of its name, checked in this order.
GROUPS = (
    ("libpython", "Python interpreter (all Python code)"),
    ("[kernel", "kernel (system calls, TCP, switches)"),
    ("cygrpc", "gRPC core"),
    ("_message", "protobuf (upb)"),
    ("loop.cpython", "event loop (uvloop)"),  # perf names a library by its file: uvloop's is loop.cpython-*.so
    ("_asyncio", "asyncio (C)"),
    ("hiredis", "hiredis"),
    ("libc.so", "libc"),
)
_ROW = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+(\S.*?)\s*$")


@dataclass(frozen=True)
class Sample:
    share: float  # percent of all samples
    thread: str
    where: str  # a shared object, or a symbol


def parse(report: str) -> list[Sample]:
    """The rows of `perf report --stdio -g none` sorted by two keys (thread, then object or symbol)."""
    rows = []
    for line in report.splitlines():
        if line.startswith("#"):
            continue
        found = _ROW.match(line)
        if found:
            rows.append(Sample(float(found.group(1)), found.group(2), found.group(3)))
    return rows


def group_of(shared_object: str) -> str:
    return next((group for piece, group in GROUPS if piece in shared_object), shared_object)


def by_group(samples: list[Sample]) -> dict[str, float]:
    """Percent of all samples per group, largest first."""
    return _totals((group_of(sample.where), sample.share) for sample in samples)


def by_thread(samples: list[Sample]) -> dict[str, float]:
    """Percent of all samples per thread, largest first."""
    return _totals((sample.thread, sample.share) for sample in samples)


def _totals(shares: Iterable[tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for key, share in shares:
        totals[key] = totals.get(key, 0.0) + share
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def perf_report(path: str, *options: str) -> str:
    exe = shutil.which("perf")
    if exe is None:
        raise SystemExit("perf is not installed (apt-get install linux-perf)")
    return subprocess.run(
        [exe, "report", "--input", path, "--stdio", "--no-children", "-g", "none", *options],
        check=True, capture_output=True, text=True,
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", help="perf record output (latency.py / compare.py --profile FILE.data)")
    parser.add_argument("--top", type=int, default=8, help="kernel symbols to list")
    args = parser.parse_args()
    objects = parse(perf_report(args.recording, "--sort", "comm,dso"))
    print("CPU by what runs:")
    for group, share in by_group(objects).items():
        print(f"  {share:6.2f}%  {group}")
    print("CPU by thread:")
    for thread, share in by_thread(objects).items():
        print(f"  {share:6.2f}%  {thread}")
    kernel = parse(perf_report(args.recording, "--sort", "comm,sym", "--dsos", "[kernel.kallsyms]"))
    print("kernel symbols (of all samples):")
    for sample in kernel[:args.top]:
        print(f"  {sample.share:6.2f}%  {sample.thread:<14} {sample.where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
