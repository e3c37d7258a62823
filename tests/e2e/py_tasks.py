"""Python tasks for the cross-language tests (tests/e2e/test_node.py), run by
`conveyor worker tests.e2e.py_tasks` from the repository root."""

from __future__ import annotations

from typing import Any

from conveyor import Worker

worker = Worker(queues=["default"], concurrency=8)


@worker.task("py.add")
def add(x: int, y: int) -> int:
    return x + y


@worker.task("py.collect")
def collect(results: list[Any]) -> dict[str, Any]:
    """A chord callback: returns the member results it was given, and their types."""
    return {"results": results, "types": [type(r).__name__ for r in results]}


@worker.task("py.echo")
async def echo(value: Any) -> Any:
    return value
