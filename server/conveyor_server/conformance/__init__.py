"""The worker conformance kit (`conveyor conformance --worker-cmd ...`): runs a worker in any
language against a server of its own and checks it keeps the worker protocol, scenario by
scenario. The task set and the scenarios: docs/conformance.md."""

from __future__ import annotations

import argparse
import sys

from conveyor import loop as event_loop

from .report import summary, table
from .runner import NAMES, Options, run_kit


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "conformance", help="check that a worker keeps the worker protocol (docs/conformance.md)",
        description="Start a server, run the worker command against it with CONVEYOR_ADDRESS, CONVEYOR_QUEUE "
                    "and CONVEYOR_TOKEN set, and run scripted scenarios against the conformance.* tasks it must "
                    "implement. Exit 0 when every scenario passed, 1 when one failed, 2 for a usage error or a "
                    "server that did not start.",
    )
    parser.add_argument("--worker-cmd", required=True, metavar="CMD",
                        help="the worker command, split like a shell would (no shell features)")
    parser.add_argument("--only", type=_names, default=frozenset(), metavar="A,B",
                        help=f"run only these scenarios (hello always runs): {', '.join(NAMES)}")
    parser.add_argument("--skip", type=_names, default=frozenset(), metavar="A,B", help="skip these scenarios")
    parser.add_argument("--startup-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long the worker may take to connect (default 30)")
    parser.add_argument("--verbose", action="store_true", help="print the worker's and the server's output")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")


def _names(text: str) -> frozenset[str]:
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def command(args: argparse.Namespace) -> int:
    options = Options(args.worker_cmd, args.only, args.skip, args.startup_timeout, args.keep)
    try:
        run = event_loop.run(run_kit(options))
    except (ValueError, RuntimeError) as exc:
        print(f"conveyor conformance: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the server and the worker were stopped on the way out
        return 130
    print(table(run.outcomes))
    print(summary(run.outcomes))
    if args.verbose or not run.passed:
        print(f"\n--- worker output (last lines) ---\n{_last(run.worker_log, 200 if args.verbose else 30)}")
    if args.verbose:
        print(f"\n--- server output (last lines) ---\n{_last(run.server_log, 200)}")
    if args.keep:
        print(f"kept {run.directory}")
    return 0 if run.passed else 1


def _last(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(none)"


__all__ = ["add_parser", "command"]
