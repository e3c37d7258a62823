"""add_member() cost as a group grows: a growing dead-letter group must not slow adds down.

    python bench/groups.py                                     # SQLite in a temporary directory
    python bench/groups.py --backend redis://127.0.0.1:6379/0 --members 50000
    python bench/groups.py --backend mongodb://127.0.0.1:27017/conveyor

Adds `--members` distinct members to one group, one call at a time, and prints the mean cost
of an add in each tenth of the run (flat means independent of group size), then the time to
read the group in pages of `--page` members. Not a pass/fail test. The group is written in a
fresh prefix and expired (ttl 60 s) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor_server.backends.base import Backend
from conveyor_server.engines import open_backend


async def measure(backend: Backend, members: int, page: int) -> None:
    group = f"bench-group-{uuid.uuid4().hex[:10]}"
    payload = b"q" * 16
    tenth = max(1, members // 10)
    started = time.perf_counter()
    for index in range(members):
        await backend.add_member(group, f"task-{uuid.uuid4().hex}", payload, keep=True)
        if (index + 1) % tenth == 0:
            elapsed = time.perf_counter() - started
            print(f"members {index + 1 - tenth:>8}..{index + 1:<8} {elapsed / tenth * 1000:8.3f} ms/add", flush=True)
            started = time.perf_counter()
    read_started, after, seen = time.perf_counter(), "", 0
    while found := await backend.members(group, after=after, limit=page):
        seen += len(found)
        after = next(reversed(found))
    print(f"read {seen} members in pages of {page}: {time.perf_counter() - read_started:.2f} s")
    await backend.expire(groups=[group])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="", help="backend URL (default: SQLite in a temporary directory)")
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--page", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url = args.backend or f"sqlite:///{Path(directory) / 'bench.db'}"
        backend = open_backend(url, ttl_seconds=60)
        await backend.connect()
        try:
            await measure(backend, args.members, args.page)
        finally:
            await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
