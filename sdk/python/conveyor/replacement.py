"""Task replacement, Celery's `self.replace(sig)`: a task returns `replace(canvas)` and the
canvas (a sig, chain, group, chord or map) runs in its place on the server; its result becomes
the task's result, and its failure the task's failure.

    @worker.task("fetch_all")
    def fetch_all(urls: list[str]) -> object:
        return replace(group(sig("fetch", u) for u in urls))     # the caller gets the list

The task's callbacks, its chain's next step or its chord wait for the replacement. The server
refuses an invalid replacement (deeper or bigger than its limits, a task id that exists) by
failing the task with InvalidReplacement. docs/canvas.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.canvas import Canvas, check_depth
from conveyor.v1 import workflow_pb2


@dataclass(frozen=True)
class Replacement:
    """What a task returns to be replaced: the canvas, as it goes on the wire."""

    workflow: workflow_pb2.Workflow


def replace(canvas: Canvas) -> Replacement:
    """Return this from a task to run `canvas` in its place (Celery's `self.replace`)."""
    check_depth(canvas)
    to_workflow = getattr(canvas, "to_workflow", None)
    if to_workflow is None:
        raise TypeError(f"replace() takes a sig, chain, group, chord or map, not {type(canvas).__name__}")
    workflow: workflow_pb2.Workflow = to_workflow()
    return Replacement(workflow)
