"""CanvasOptions: what a submitter sets on a whole task or workflow at once, as Celery's
canvas.apply_async(args, kwargs, queue=..., priority=..., countdown=..., eta=...) does.

- args are prepended and kwargs merged (these win) into the first tasks: those that start when
  the submission does (a chain's first step, every group member, every chord header member);
  immutable tasks keep their own, as Celery's do.
- queue and priority are defaults for every task and callback that sets none.
- eta or countdown delays the first tasks that set neither, so the whole canvas starts then.

A json_value among args and kwargs must be valid JSON, as in any task's (core/task_schemas.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2

from ..errors import InvalidArgument
from ..task_schemas import check_json_values
from .kinds import workflow_kind
from .primitives import primitive
from .signatures import all_signatures


def entry_tasks(workflow: workflow_pb2.Workflow) -> Iterator[task_pb2.Signature]:
    """The tasks that start when `workflow` starts (references into it)."""
    kind = workflow_kind(workflow)
    if kind is None:
        return iter(())
    return primitive(kind).entry_tasks(workflow, entry_tasks)


def apply_options(request: task_service_pb2.SubmitRequest, where: str) -> None:
    """Apply the request's options to its tasks in place, then clear them (applied once)."""
    if not request.HasField("options"):
        return
    options = request.options
    if options.HasField("eta") and options.HasField("countdown"):
        raise InvalidArgument(f"{where}.options: set eta or countdown, not both")
    # Checked here, as they stand: once applied they are the first tasks' (or nobody's).
    check_json_values(options.args, options.kwargs, f"{where}.options")
    target = request.WhichOneof("target")
    if target == "task":
        first: list[task_pb2.Signature] = [request.task]
        message: task_pb2.Signature | workflow_pb2.Workflow = request.task
    elif target == "workflow":
        first = list(entry_tasks(request.workflow))
        message = request.workflow
    else:
        return
    if options.queue or options.priority:
        for signature in all_signatures(message):
            if not signature.queue:
                signature.queue = options.queue
            if not signature.priority:
                signature.priority = options.priority
    for signature in first:
        _apply_to_first(signature, options)
    request.ClearField("options")


def _apply_to_first(signature: task_pb2.Signature, options: task_service_pb2.CanvasOptions) -> None:
    if not signature.immutable:
        if options.args:
            own = list(signature.args)
            del signature.args[:]
            signature.args.extend([*options.args, *own])
        for name, value in options.kwargs.items():
            signature.kwargs[name].CopyFrom(value)
    if not signature.HasField("eta") and not signature.HasField("countdown"):
        if options.HasField("eta"):
            signature.eta.CopyFrom(options.eta)
        elif options.HasField("countdown"):
            signature.countdown.CopyFrom(options.countdown)

