"""Replaying and deleting dead letters: tasks that failed for good, listed in the backend's
DEAD_LETTERS_GROUP (core/outcomes.py lists them).

A replay submits the dead letter's call again under an id derived from the dead letter's own
(`replay_id`), so replaying it twice, from any replica, creates one task: the second replay
finds the first one's task and answers its id. Only dead letters are replayed or deleted: an
unknown id is NotFound, any other task FailedPrecondition, and nothing changes then."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

from conveyor.v1 import task_pb2, task_service_pb2

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .records import DEAD_LETTERS_GROUP, TaskStates
from .store import Loaded, TaskStore
from .submission import Submitter

# Fixed forever: replay ids must come out the same on every replica and every version.
REPLAY_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4b8e-9a57-0d3f6c2b9e41")
# Members read per backend call while looking for one on the list.
MEMBER_PAGE = 64
# Replays submitted at once (each is its own submission, so a clash refuses only itself).
REPLAY_CONCURRENCY = 32


def replay_id(task_id: str) -> str:
    """The id of the task that replays dead letter `task_id`."""
    return str(uuid.uuid5(REPLAY_NAMESPACE, task_id))


class DeadLetters:
    def __init__(self, store: TaskStore, submitter: Submitter) -> None:
        self.store = store
        self.submitter = submitter

    async def listed(self, task_id: str) -> bool:
        """Whether `task_id` is on the dead-letter list. Members come ordered by name, so the
        search starts just before it (after its prefix) and stops once past it."""
        after = task_id[:-1]
        while page := await self.store.backend.members(DEAD_LETTERS_GROUP, after=after, limit=MEMBER_PAGE):
            if task_id in page:
                return True
            after = max(page)
            if after > task_id:
                return False
        return False

    async def replay(self, task_ids: Sequence[str], checked: bool = False) -> list[str]:
        """Replay the dead letters (their calls as new tasks) and take them off the list; returns
        the new ids in order. `checked`: the ids come from the list itself (no need to look)."""
        ids = list(dict.fromkeys(task_ids))
        loaded = await self.store.load(ids)
        if not checked:
            for task_id in ids:
                _check_failed(task_id, loaded.get(task_id))
        replays = {task_id: replay_id(task_id) for task_id in ids if task_id in loaded}
        done = await self.store.load(list(replays.values()))
        if not checked:
            for task_id, new_id in replays.items():
                if new_id not in done and not await self.listed(task_id):
                    raise FailedPrecondition(
                        f"task {task_id!r} failed but is not a dead letter (it was deleted from the list): "
                        "nothing replayed"
                    )
        fresh = [task_id for task_id, new_id in replays.items() if new_id not in done]
        gate = asyncio.Semaphore(REPLAY_CONCURRENCY)

        async def submit(task_id: str) -> None:
            async with gate:
                await self._submit(loaded[task_id], replays[task_id])

        await asyncio.gather(*(submit(task_id) for task_id in fresh))
        for task_id in replays:
            await self.store.backend.remove_member(DEAD_LETTERS_GROUP, task_id)
        return list(replays.values())

    async def _submit(self, dead: Loaded, new_id: str) -> None:
        signature = task_pb2.Signature()
        signature.CopyFrom(dead.record.result.signature)
        signature.id = new_id
        signature.idempotency_key = ""
        signature.ClearField("eta")
        signature.ClearField("countdown")
        # AlreadyExists: a replay of the same dead letter (on another replica, say) got there first.
        with contextlib.suppress(AlreadyExists):
            await self.submitter.submit([task_service_pb2.SubmitRequest(task=signature)])

    async def delete(self, task_id: str) -> None:
        """Take one dead letter off the list (its record stays until it expires)."""
        if not task_id:
            raise InvalidArgument("task_id is required: the id of the dead letter to delete")
        if await self.listed(task_id):
            await self.store.backend.remove_member(DEAD_LETTERS_GROUP, task_id)
            return
        record = await self.store.get(task_id)
        if record is None:
            raise NotFound(
                f"no task with id {task_id!r} (unknown, or its record expired)",
                reason="TASK_NOT_FOUND", metadata={"task_id": task_id},
            )
        if record.result.state == TaskStates.TASK_STATE_FAILURE:
            raise FailedPrecondition(f"task {task_id!r} is not a dead letter (any more): it was replayed or deleted")
        raise FailedPrecondition(f"task {task_id!r} is {state_name(record.result.state)}, not a dead letter")


def _check_failed(task_id: str, found: Loaded | None) -> None:
    if not task_id:
        raise InvalidArgument("task_ids holds an empty id")
    if found is None:
        raise NotFound(
            f"no task with id {task_id!r} (unknown, or its record expired): nothing replayed",
            reason="TASK_NOT_FOUND", metadata={"task_id": task_id},
        )
    state = found.record.result.state
    if state != TaskStates.TASK_STATE_FAILURE:
        raise FailedPrecondition(
            f"task {task_id!r} is {state_name(state)}, not a dead letter: only a task that failed for good can be "
            "replayed; nothing replayed"
        )


def state_name(state: int) -> str:
    try:
        return TaskStates.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]  # an int from the record
    except ValueError:
        return str(state)
