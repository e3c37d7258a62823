"""The kit's pass/fail table."""

from __future__ import annotations

from collections.abc import Sequence

from .runner import Outcome


def table(outcomes: Sequence[Outcome]) -> str:
    """One line per scenario: name, PASS/FAIL/SKIP, time, and the first line of its message;
    the rest of a long message (a worker's output) follows, indented."""
    width = max([len("scenario"), *(len(o.name) for o in outcomes)])
    lines = [f"{'scenario':<{width}}  result  time    message"]
    for outcome in outcomes:
        first, _, rest = outcome.message.partition("\n")
        took = "     -" if outcome.status == "SKIP" else f"{outcome.seconds:5.1f}s"
        lines.append(f"{outcome.name:<{width}}  {outcome.status:<6}  {took}  {first}".rstrip())
        if rest:
            lines.append(rest)
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome]) -> str:
    counts = {status: sum(1 for o in outcomes if o.status == status) for status in ("PASS", "FAIL", "SKIP")}
    verdict = "conformance: FAILED" if counts["FAIL"] else "conformance: passed"
    return f"{verdict} ({counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} not run)"
