"""Task replacement (Celery's `self.replace`): a task ends its attempt by naming a canvas that
runs in its place, and the canvas's outcome becomes the task's.

1. Report. The worker reports OUTCOME_REPLACED with the canvas. `prepare` checks it before
   anything is written (the submit-time checks, the nesting of replacements, task ids that exist
   already); a replacement that fails them fails the task for good with InvalidReplacement.
2. Mark. Under the live lease, the task's record keeps the canvas (`TaskRecord.replacement`)
   and its lease ends; the task stays unfinished (RECEIVED or STARTED), so whatever waits on it
   (a caller, the next chain step, a chord) keeps waiting.
3. Start. The canvas runs as a workflow of its own (`TaskRecord.replaced_by`, a new id chosen
   at the report), whose plan names the task (`WorkflowPlan.replaces_task_id`). Its tasks' ids,
   when the canvas sets none, derive from that workflow id, so planning it again gives the
   same plan and records: a repair creates and starts nothing twice. The task's broker message
   is acked only once the replacement started; until then it comes back, and dispatch (which
   treats a replaced task as ended) repeats the start. The repair of lost messages leaves a
   replaced task alone, as it does an ended one.
4. Finish. When the replacement's root node ends, the task takes its outcome (SUCCESS with its
   value, CANCELLED, or FAILURE with its error) with compare-and-set, once, and then the
   task's own follow-ups run (its callbacks, the next move of its workflow) as after any end.
   The replacement's last task's message waits for that, so a repair repeats it.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2, workflow_pb2

from ..config import Limits
from .errors import InvalidArgument
from .planner import CompiledWorkflow, compile_workflow, new_workflow_id
from .records import TaskStates, error, is_terminal, new_record, transition
from .signatures import filled, queues_named
from .store import TaskStore
from .validation import check_workflow
from .workflow import WorkflowEngine

REPLACED = worker_service_pb2.OUTCOME_REPLACED
# Names the ids derived for a replacement's tasks (uuid5 of its workflow id and a count).
_ID_NAMESPACE = uuid.UUID("5b0c2d54-6f1e-4a43-9a55-2f0d7a3c9e11")

AfterTerminal = Callable[[Sequence[records_pb2.TaskRecord], bool], Awaitable[None]]


def is_replaced(record: records_pb2.TaskRecord) -> bool:
    return bool(record.replaced_by)


def waits_for_replacement(record: records_pb2.TaskRecord) -> bool:
    """Replaced, and its replacement has not ended yet."""
    return is_replaced(record) and not is_terminal(record)


@dataclass(frozen=True, slots=True)
class Checked:
    """What `prepare` found for one replacement: its workflow id and nesting, or why it is refused."""

    workflow_id: str = ""
    depth: int = 0
    refusal: result_pb2.TaskError | None = None


def mark_replaced(
    record: records_pb2.TaskRecord, outcome: worker_service_pb2.TaskOutcome, checked: Checked | None,
) -> result_pb2.TaskError | None:
    """Apply a checked replacement to the task's record (inside its compare-and-set); returns
    the refusal instead when it was refused, or not checked (the caller fails the task with it)."""
    if checked is None:
        return error("InvalidReplacement", f"task {outcome.task_id}: the replacement could not be checked")
    if checked.refusal is not None:
        return checked.refusal
    record.replacement.CopyFrom(outcome.replacement)
    record.replacement_depth = checked.depth
    record.replaced_by = checked.workflow_id
    record.lease_token = ""  # the attempt is over: later reports under its lease are refused
    return None


class Replacements:
    def __init__(
        self, store: TaskStore, workflow: WorkflowEngine, default_queue: str, limits: Limits,
        after_terminal: AfterTerminal,
    ) -> None:
        self.store = store
        self.workflow = workflow
        self.default_queue = default_queue
        self.limits = limits
        self.after_terminal = after_terminal

    # -- 1. report --------------------------------------------------------------------------

    async def prepare(
        self, outcomes: Sequence[worker_service_pb2.TaskOutcome], allowed_queues: Collection[str] = (),
    ) -> dict[str, Checked]:
        """Check the replacements among `outcomes` (by task id); `allowed_queues`, when given, are
        the only queues they may use (the worker's token's). Reads the backend: the tasks'
        records, their workflows' plans (for the nesting) and the ids the replacements use."""
        replacing = {o.task_id: o for o in outcomes if o.outcome == REPLACED}
        if not replacing:
            return {}
        loaded = await self.store.load(list(replacing))
        checked: dict[str, Checked] = {}
        for task_id, outcome in replacing.items():
            found = loaded.get(task_id)
            if found is None or is_terminal(found.record) or is_replaced(found.record):
                continue  # the report is refused when it is recorded
            try:
                checked[task_id] = await self._check(found.record, outcome, allowed_queues)
            except InvalidArgument as exc:
                checked[task_id] = Checked(refusal=error("InvalidReplacement", f"task {task_id}: {exc}"))
        return checked

    async def _check(
        self, record: records_pb2.TaskRecord, outcome: worker_service_pb2.TaskOutcome, allowed_queues: Collection[str],
    ) -> Checked:
        """The replacement's new workflow id and nesting depth (1 for a task that no replacement
        holds), or InvalidArgument."""
        if not outcome.HasField("replacement"):
            raise InvalidArgument("OUTCOME_REPLACED without a replacement: set TaskOutcome.replacement")
        check_workflow(outcome.replacement, self.limits)
        used = queues_named(outcome.replacement, self.default_queue)
        if allowed_queues and not used <= set(allowed_queues):
            raise InvalidArgument(
                f"the replacement uses queues {sorted(used - set(allowed_queues))}; this worker's token may use "
                f"only {sorted(allowed_queues)}"
            )
        plan = await self.store.plan(record.result.workflow_id) if record.result.workflow_id else None
        depth = (plan.replacement_depth if plan is not None else 0) + 1
        if depth > self.limits.max_workflow_depth:
            raise InvalidArgument(
                f"replacements nest deeper than the limit of {self.limits.max_workflow_depth} (a task of a "
                "replacement replaced in turn counts one more; max_workflow_depth)"
            )
        checked = Checked(new_workflow_id(), depth)
        compiled = self._compile(record, outcome.replacement, checked)
        taken = await self.store.load(list(compiled.signatures))
        if taken:
            shown = ", ".join(sorted(taken)[:5])
            raise InvalidArgument(f"the replacement uses task ids that already exist: {shown}")
        return checked

    # -- 3. start ---------------------------------------------------------------------------

    async def start(self, record: records_pb2.TaskRecord, repair: bool) -> None:
        """Plan, store and start the replacement of a replaced task; idempotent."""
        compiled = self._compile(record, record.replacement, Checked(record.replaced_by, record.replacement_depth))
        plan = compiled.plan
        await self.store.save_plan(plan)  # kept as it was when it exists
        nodes = {node.task_id: node.node_id for node in plan.nodes if node.task_id}
        await self.store.create(
            new_record(signature, workflow_id=plan.workflow_id, node_id=nodes[signature.id], enqueued=False)
            for signature in compiled.signatures.values()
        )
        await self.workflow.start_workflow(plan, repair)

    def _compile(
        self, record: records_pb2.TaskRecord, canvas: workflow_pb2.Workflow, checked: Checked,
    ) -> CompiledWorkflow:
        """The replacement's plan; the same every time for the same workflow id and canvas. Its
        tasks join the replaced task's trace (its trace headers)."""
        count = itertools.count()
        inherited = dict(record.result.signature.headers)

        def fill(signature: task_pb2.Signature) -> task_pb2.Signature:
            derived = str(uuid.uuid5(_ID_NAMESPACE, f"{checked.workflow_id}/{next(count)}"))
            return filled(signature, self.default_queue, task_id=derived, inherit_headers=inherited)

        compiled = compile_workflow(canvas, checked.workflow_id, fill)
        compiled.plan.replaces_task_id = record.result.task_id
        compiled.plan.replacement_depth = checked.depth
        return compiled

    # -- 4. finish --------------------------------------------------------------------------

    async def finish(self, plan: records_pb2.WorkflowPlan, outcome: records_pb2.NodeOutcome, repair: bool) -> None:
        """The replacement ended with `outcome`: the task it replaces takes it, then the task's
        follow-ups run (again, on repair, if an earlier pass ended it)."""
        task_id = plan.replaces_task_id

        def end(_: str, record: records_pb2.TaskRecord) -> bool:
            if not waits_for_replacement(record) or record.replaced_by != plan.workflow_id:
                return False
            _take_outcome(record, outcome)
            return True

        ended = list((await self.store.update([task_id], end)).values())
        if not ended and repair:
            found = await self.store.get(task_id)
            if found is not None and is_terminal(found) and is_replaced(found):
                ended = [found]
        if ended:
            await self.after_terminal(ended, repair)


def _take_outcome(record: records_pb2.TaskRecord, outcome: records_pb2.NodeOutcome) -> None:
    """The replaced task ends as its replacement did; a failure of any kind (an expired task's
    included) is the task's FAILURE, with the error that ended the replacement."""
    result = record.result
    if outcome.ok:
        if not result.signature.ignore_result:
            result.result.CopyFrom(outcome.value)
        transition(record, TaskStates.TASK_STATE_SUCCESS)
        return
    result.error.CopyFrom(outcome.error)
    cancelled = outcome.state == TaskStates.TASK_STATE_CANCELLED
    state = TaskStates.TASK_STATE_CANCELLED if cancelled else TaskStates.TASK_STATE_FAILURE
    transition(record, state, error=outcome.error)
