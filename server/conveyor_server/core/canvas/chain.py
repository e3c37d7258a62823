"""Chain: steps one after another, each step's result prepended to the next step's args
(unless that step is immutable). Its result is the last step's.

A step that fails ends the chain with that step's error: the steps after it end CANCELLED (so
that waits on them end), `on_error` runs once. Once the last step succeeds, `on_success` runs
with the chain's result (Celery's chain.link).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from conveyor.v1 import task_pb2, workflow_pb2

from ..errors import InvalidArgument
from .base import Checker, Drive, Engine, NodeOutcome, Planner, PlanNode, Reading, Starts
from .tree import task_ids


class ChainPrimitive:
    def check(self, workflow: workflow_pb2.Workflow, checker: Checker, depth: int, where: str) -> None:
        chain = workflow.chain
        if not chain.steps:
            raise InvalidArgument(f"{where}: a chain needs at least one step")
        for i, step in enumerate(chain.steps):
            checker.node(step, depth + 1, f"{where}.chain[{i}]")
        checker.callbacks(chain.on_error, depth + 1, f"{where}.chain.on_error")
        checker.callbacks(chain.on_success, depth + 1, f"{where}.chain.on_success")

    def plan(self, workflow: workflow_pb2.Workflow, node: PlanNode, planner: Planner) -> None:
        chain = workflow.chain
        node.on_error.extend(chain.on_error)
        node.on_success.extend(chain.on_success)
        node.child_ids.extend(planner.add(step, node.node_id, i) for i, step in enumerate(chain.steps))

    def entry_tasks(
        self, workflow: workflow_pb2.Workflow, entries: Callable[[workflow_pb2.Workflow], Iterator[task_pb2.Signature]],
    ) -> Iterator[task_pb2.Signature]:
        for first in workflow.chain.steps[:1]:  # none in an empty chain (refused by check)
            yield from entries(first)

    def start(self, node: PlanNode, value: task_pb2.Value | None, starts: Starts) -> None:
        starts.node(starts.child(node.child_ids[0]), value)

    async def child_done(
        self, engine: Engine, drive: Drive, node: PlanNode, child: PlanNode, outcome: NodeOutcome,
    ) -> None:
        if outcome.ok:
            if child.index + 1 < len(node.child_ids):
                await engine.start(drive, drive.nodes[node.child_ids[child.index + 1]], outcome.value)
                return
            await engine.fire(drive, node, "ok", node.on_success, outcome)
            await engine.node_done(drive, node, outcome)
            return
        remaining = [t for step in node.child_ids[child.index + 1:] for t in task_ids(drive.plan, step)]
        await engine.cancel_unstarted(remaining, f"an earlier step of chain {node.node_id} failed")
        await engine.fire(drive, node, "err", node.on_error, outcome)
        await engine.node_done(drive, node, outcome)

    def resolve(self, node: PlanNode, reading: Reading) -> NodeOutcome | None:
        outcome = None
        for step in node.child_ids:
            outcome = reading.node(step)
            if outcome is None or not outcome.ok:
                return outcome
        return outcome

    def result_child(self, node: PlanNode) -> str:
        return node.child_ids[-1] if node.child_ids else ""

    def stored_keys(self, workflow_id: str, node: PlanNode) -> tuple[list[str], list[str]]:
        return [], []


CHAIN = ChainPrimitive()
