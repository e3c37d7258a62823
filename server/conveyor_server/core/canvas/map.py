"""Map: one call of a task per item (Celery's map, starmap and chunks), expanded here into chunk
tasks of `chunk_size` items each. The client sends the items once; each chunk task's message
holds only its own items, as its args, so 100,000 items make 1,000 bounded messages, not one.

A chunk task carries the header conveyor-map ("map": each arg is one call's only arg;
"starmap": each arg is one call's list of args); the worker calls the task once per item, in
order, and returns the list of results. Chunk tasks are immutable: a map ignores the previous
chain step's result and submit-time args. The node then behaves as a group of its chunks (same
counting, same GroupMemberFailed), except that a map's result is the chunks' lists concatenated,
one value per item, while a chunks node (`nested`) keeps one list per chunk, as Celery's does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

from conveyor.v1 import task_pb2, workflow_pb2
from conveyor.values import to_jsonable

from ..errors import InvalidArgument
from ..records import TaskStates, error
from .base import Checker, NodeOutcome, Planner, PlanNode
from .group import GroupPrimitive, combine_members

MAP_HEADER = "conveyor-map"
DEFAULT_CHUNK_SIZE = 100


def chunk_count(map_: workflow_pb2.Map) -> int:
    size = map_.chunk_size or DEFAULT_CHUNK_SIZE
    return -(-len(map_.items) // size)


def chunk_task(map_: workflow_pb2.Map, index: int) -> task_pb2.Signature:
    """Chunk `index` of the map: its task with that chunk's items as args."""
    size = map_.chunk_size or DEFAULT_CHUNK_SIZE
    chunk = task_pb2.Signature()
    chunk.CopyFrom(map_.task)
    if map_.task.id:
        chunk.id = f"{map_.task.id}.c{index}"  # a resubmit names the same chunks
    chunk.immutable = True
    chunk.headers[MAP_HEADER] = "starmap" if map_.star else "map"
    chunk.args.extend(map_.items[index * size:(index + 1) * size])
    return chunk


class MapPrimitive(GroupPrimitive):
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        map_ = workflow.map
        where = f"{where}.map"
        if not map_.HasField("task") or not map_.task.name:
            raise InvalidArgument(f"{where}: a map needs a task")
        if map_.task.args:
            raise InvalidArgument(f"{where}.task: a map's task takes no args (the items are its calls' args)")
        if map_.task.on_success or map_.task.on_error:
            raise InvalidArgument(
                f"{where}.task: a map's task takes no callbacks (they would run per chunk); "
                "link them to a chain around the map"
            )
        if map_.task.idempotency_key or map_.task.HasField("unique_for"):
            raise InvalidArgument(
                f"{where}.task: a map's task takes no idempotency_key or unique_for (its chunks would share it)"
            )
        count = chunk_count(map_)
        checker.planned_tasks(count, where)
        for index in range(count):  # each chunk's size is checked as any task's
            checker.task(chunk_task(map_, index), depth + 1, f"{where}.chunk[{index}]")

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        map_ = workflow.map
        node.nested = map_.nested
        node.child_ids.extend(
            planner.add(workflow_pb2.Workflow(task=chunk_task(map_, i)), node.node_id, i)
            for i in range(chunk_count(map_))
        )

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        # The template: submit options (queue, countdown, ...) reach every chunk through it.
        yield workflow.map.task

    def combine(self, node: PlanNode, members: Sequence[NodeOutcome], member_tasks: Sequence[str]) -> NodeOutcome:
        combined = combine_members(members, member_tasks)
        if not combined.ok or node.nested:
            return combined
        flat: list[object] = []
        for index, member in enumerate(members):
            values = to_jsonable(member.value)
            if not isinstance(values, list):  # a worker that does not know the conveyor-map header
                message = f"chunk {index} ({member_tasks[index]}) returned {type(values).__name__}, not a list"
                return NodeOutcome(ok=False, error=error("MapChunkNotList", message),
                                   task_id=member.task_id, state=TaskStates.TASK_STATE_FAILURE)
            flat.extend(values)
        combined.value.json_value = json.dumps(flat)
        return combined


MAP = MapPrimitive()
