"""Every signature a submission holds (tasks, and callbacks at any depth), found by walking
the canvas messages; references, so callers may change them in place."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message

from conveyor.v1 import task_pb2, workflow_pb2

# The messages that can hold signatures: a walk never descends into args, kwargs or options.
_CANVAS_TYPES = frozenset({
    task_pb2.Signature.DESCRIPTOR.full_name,
    workflow_pb2.Workflow.DESCRIPTOR.full_name,
    workflow_pb2.Chain.DESCRIPTOR.full_name,
    workflow_pb2.Group.DESCRIPTOR.full_name,
    workflow_pb2.Chord.DESCRIPTOR.full_name,
    workflow_pb2.Map.DESCRIPTOR.full_name,
})


def all_signatures(message: Message) -> Iterator[task_pb2.Signature]:
    """Depth first, without recursion (a message may nest deeper than Python's stack)."""
    stack = [message]
    while stack:
        current = stack.pop()
        if isinstance(current, task_pb2.Signature):
            yield current
        children: list[Message] = []
        for field, value in current.ListFields():
            if field.message_type is None or field.message_type.full_name not in _CANVAS_TYPES:
                continue
            children.extend(value if field.is_repeated else (value,))
        stack.extend(reversed(children))
