"""The fault-injection scenarios of tests/faults/ as the engine x outage table: per engine and outage, what
was submitted and succeeded, what was lost, stuck or ran twice, whether every chord callback ran exactly
once, and the time to resume (from the engine's return to the first task that started after it).

    python bench/faults.py                                  # every scenario
    python bench/faults.py worker-kill broker-cut           # a subset, by name (repeat a name to rerun it)
    python bench/faults.py --tasks 5000 --submit-seconds 20 # a heavier load
    python bench/faults.py --list                           # the scenarios and what each does
    CONVEYOR_FAULTS_CODE=/tmp/head python bench/faults.py   # servers and workers from another checkout

Each scenario starts its own private engines (redis-servers with AOF on and fsync always, nx-27017, memcached,
a RabbitMQ node on ports of its own, moto in a process of its own, or a SQLite file), TCP proxies,
`conveyor serve` replicas and `conveyor worker` processes under a temporary directory (kept with --keep), runs the load
with its fault, and stops everything. The columns are described in tests/faults/row.py; each scenario's
detailed row is printed as it ends. Exits 1 when any scenario lost, stranded or double-fired something (the
same checks the tests assert). The load printed first is the one asked for; the scenarios on a slow engine
(nx-27017, moto) spread it out to that engine's pace (their `tune` in tests/faults/scenarios.py). sqs-10s runs
its server with a quick repair of lost messages (its row's outage says so): moto loses its queues when it
restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.harness import Load, Row, run_scenario
from tests.faults.rig import code_under_test
from tests.faults.row import format_engine_table
from tests.faults.scenarios import SCENARIOS


def parse(argv: list[str]) -> argparse.Namespace:
    defaults = Load()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help=f"names, default all: {', '.join(SCENARIOS)}")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--tasks", type=int, default=defaults.tasks)
    parser.add_argument("--chords", type=int, default=defaults.chords)
    parser.add_argument("--members", type=int, default=defaults.members)
    parser.add_argument("--task-seconds", type=float, default=defaults.task_seconds)
    parser.add_argument("--submit-seconds", type=float, default=defaults.submit_seconds)
    parser.add_argument("--stuck-after", type=float, default=defaults.stuck_after_seconds,
                        help="seconds to wait for every accepted id to be terminal once the fault ended")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directories")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each row's notes and problems")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.list:
        for name, factory in SCENARIOS.items():
            print(f"{name:<22} {factory().description}")
        return 0
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    load = dataclasses.replace(
        Load(), tasks=args.tasks, chords=args.chords, members=args.members, task_seconds=args.task_seconds,
        submit_seconds=args.submit_seconds, stuck_after_seconds=args.stuck_after,
    )
    root = Path(tempfile.mkdtemp(prefix="conveyor-faults-"))
    print(f"load: {load.describe()}\ncode under test: {code_under_test()}\nlogs: {root}\n", flush=True)
    rows: list[Row] = []
    try:
        for index, name in enumerate(args.scenarios or list(SCENARIOS)):
            scenario = SCENARIOS[name]()
            workdir = root / f"{index:02d}-{name}"
            workdir.mkdir()
            row = await run_scenario(scenario, workdir, load)
            rows.append(row)
            print(f"{scenario.description}\n{row.report() if args.verbose or not row.ok else row.line()}\n",
                  flush=True)
    finally:
        if not args.keep and all(r.ok for r in rows):
            shutil.rmtree(root, ignore_errors=True)
    print(format_engine_table(rows))
    failed = [r.scenario for r in rows if not r.ok]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (logs kept in {root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
