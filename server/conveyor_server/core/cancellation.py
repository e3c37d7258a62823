"""Cancels tasks and workflows. The CANCELLED state is stored, so it survives restarts:
a queued task is dropped when it comes up, a running one is stopped on its worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2

from .errors import NotFound
from .followups import FollowUps
from .outbox import FOLLOW_UPS, Outbox
from .planner import task_ids
from .records import TaskStates, error, is_terminal, transition
from .store import TaskStore
from .withdrawn import queued, withdraw

StopRunning = Callable[[list[str]], Awaitable[None]]


class Canceller:
    def __init__(self, store: TaskStore, followups: FollowUps, outbox: Outbox, stop_running: StopRunning) -> None:
        self.store = store
        self.followups = followups
        self.outbox = outbox
        self.stop_running = stop_running

    async def cancel(self, target_id: str) -> list[str]:
        """Cancel a task or every unfinished task of a workflow; returns the ids cancelled."""
        plan = await self.store.plan(target_id) if target_id.startswith("wf-") else None
        if plan is not None:
            ids = task_ids(plan)
        elif await self.store.get(target_id) is not None:
            ids = [target_id]
        else:
            raise NotFound(
                f"no task or workflow with id {target_id!r}", reason="TASK_NOT_FOUND", metadata={"task_id": target_id}
            )
        cause = error("Cancelled", f"cancelled by request ({target_id})")
        if plan is not None:
            cancelled = await self._end(ids, cause)
            await self.followups.workflow.finished(plan)
            if plan.replaces_task_id:  # a replacement: the task it runs in place of ends with it
                cancelled.update(await self._end_with_follow_ups([plan.replaces_task_id], cause))
            return list(cancelled)
        # One task (perhaps of a workflow: its workflow moves on as after any failure).
        return list(await self._end_with_follow_ups(ids, cause))

    async def end_purged(self, task_ids: list[str], queue: str) -> list[str]:
        """End the tasks whose messages a purge of `queue` dropped: CANCELLED with error type
        "Purged", then their follow-ups (callbacks, the next move of their workflow), so waits,
        chains and chords on them end. Terminal records are left alone; returns the ids ended."""
        cause = error("Purged", f"dropped from queue {queue!r} by a purge")
        return list(await self._end_with_follow_ups(task_ids, cause, messages_left=False))

    async def _end_with_follow_ups(
        self, ids: list[str], cause: result_pb2.TaskError, messages_left: bool = True,
    ) -> dict[str, records_pb2.TaskRecord]:
        # Promised before the records change: if the follow-ups below do not complete (an
        # engine error, a crash), the reconciler runs them.
        entry_id = await self.outbox.promise(FOLLOW_UPS, ids)
        ended = await self._end(ids, cause, messages_left)
        await self.followups.after_terminal(list(ended.values()))
        self.outbox.confirm(entry_id)
        return ended

    async def _end(
        self, ids: list[str], cause: result_pb2.TaskError, messages_left: bool = True,
    ) -> dict[str, records_pb2.TaskRecord]:
        """CANCELLED with `cause` for every task not ended yet; running ones are told to stop.
        `messages_left`: queued ones keep their message, so they are counted out of their
        queue's numbers until it is dropped (core/withdrawn.py)."""
        running: list[str] = []
        waiting: dict[str, records_pb2.TaskRecord] = {}

        def end(task_id: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record):
                return False
            if record.result.state in (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED):
                running.append(task_id)
            if messages_left and queued(record):
                waiting[task_id] = records_pb2.TaskRecord()
                waiting[task_id].CopyFrom(record)  # before the transition: its due time
            record.result.error.CopyFrom(cause)
            transition(record, TaskStates.TASK_STATE_CANCELLED, error=cause)
            return True

        ended = await self.store.update(ids, end)
        for replaced_by in [record.replaced_by for record in ended.values() if record.replaced_by]:
            # A replaced task's replacement runs in its place: it is cancelled too. Its messages
            # are its own, in its own queues: whatever dropped the replaced task's message left
            # them (a purge of one of those queues un-lists them itself: withdrawn.purged).
            replacement = await self.store.plan(replaced_by)
            if replacement is not None:
                ended.update(await self._end(task_ids(replacement), cause))
                await self.followups.workflow.finished(replacement)
        await withdraw(self.store.backend, [record for task_id, record in waiting.items() if task_id in ended])
        if running:
            await self.stop_running([t for t in dict.fromkeys(running) if t in ended])
        return ended
