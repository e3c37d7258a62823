"""Where a py-spy profile's time went: self time per package, and the heaviest Conveyor frames.

    python bench/compare.py --systems conveyor --tasks 20000 --profile /tmp/server.txt
    python bench/profile_summary.py /tmp/server.txt
    python bench/compare.py --systems conveyor --profile-worker /tmp/worker.txt    # a worker's, likewise

Reads py-spy's raw (collapsed stacks) output: one line per stack, frames joined by ';' and
followed by a sample count. Last, the share of samples whose stack is in the dispatch-policy code
of issue #15 (routing, the task registry, strict and JSON checks, limits, admission, unique and
idempotency keys, queue scopes): with no policy configured, what those features cost the server.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Packages a frame's file is filed under, checked in this order; anything else keeps its file name.
PACKAGES = ("conveyor_server/", "conveyor/", "redis/", "grpc", "asyncio/", "uvloop", "google/protobuf",
            "prometheus_client", "opentelemetry", "threading", "contextlib")
_FILE = re.compile(r"\(([^:)]+)")
# Dispatch-policy code (issue #15), by the frames it runs in.
POLICY = {
    "routing": re.compile(r"core/routing(_timeout)?\.py|\.can_run |\.runner_for |\._pass_on "),
    "task registry": re.compile(r"core/task_registry\.py"),
    "strict and JSON checks": re.compile(r"core/task_schemas\.py|core/call_schemas\.py"),
    "rate limits, concurrency keys": re.compile(r"core/limits/|api/ratelimit\.py"),
    "admission": re.compile(r"core/admission\.py"),
    "unique and idempotency keys": re.compile(r"\._resolve_(keys|unique|idempotency) "),
    "queue scopes": re.compile(r"\._check_scope "),
}


def package_of(frame: str) -> str:
    found = _FILE.search(frame)
    path = found.group(1) if found else frame
    return next((package for package in PACKAGES if package in path), path)


def summarize(path: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    policy: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[package_of(frames[-1])] += samples
        matched = [name for name, pattern in POLICY.items() if pattern.search(stack)]
        for name in matched:
            policy[name] += samples
        if matched:
            policy["any of them"] += samples
        for frame in set(frames):
            if "conveyor_server/" in frame or "(conveyor/" in frame:  # the server, or the SDK's worker
                inclusive[frame] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time by package:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "Conveyor frames, time including callees:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "dispatch-policy code (issue #15), time including callees:"]
    lines += [f"  {100 * policy[name] / total:5.2f}%  {name}" for name in [*POLICY, "any of them"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="py-spy raw output (compare.py --profile FILE.txt)")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    args = parser.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()
