"""The new transitions of a watched task, kept as its record's result and where they start.

A watch over many tasks sends each transition as a TaskEvent that carries the task's result.
Building those events one by one and then copying them into a response copied every result
twice (issue #21: a third of the server's watch cost); a span is written once, straight into
the message that carries it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from conveyor.v1 import result_pb2


@dataclass(frozen=True, slots=True)
class EventSpan:
    """`result.history[first:]`, each an event carrying `result` as it was read (so a STARTED
    event read after the task finished carries the finished result, as TaskEvent says)."""

    result: result_pb2.TaskResult
    first: int

    def transitions(self) -> Iterator[result_pb2.Transition]:
        history = self.result.history
        for index in range(self.first, len(history)):
            yield history[index]

    def write(self, event: result_pb2.TaskEvent, transition: result_pb2.Transition) -> None:
        """Fill an empty `event` (a new element of a response's repeated field, say) for `transition`."""
        event.task_id = self.result.task_id
        event.state = transition.state
        event.workflow_id = self.result.workflow_id
        event.at.CopyFrom(transition.at)
        event.result.CopyFrom(self.result)

    def events(self) -> Iterator[result_pb2.TaskEvent]:
        for transition in self.transitions():
            event = result_pb2.TaskEvent()
            self.write(event, transition)
            yield event
