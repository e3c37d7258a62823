"""A streamed submission (TaskService.SubmitStream): a group, or a chord's header, whose members
arrive in pieces after an opening message, then a commit seals it.

Nothing is stored before the commit. The pieces stay in this process's memory, and the commit
hands the whole request to the Submitter, whose rules of acceptance then hold unchanged (outbox
entry first, then records, then publish). So a stream that its client abandons, or that dies
with this server, leaves nothing behind: no record, no plan, nothing runnable. And a chord's
callback can only start once its header is sealed, because nothing starts before.

Bounds: a piece holds at most MAX_PIECE_MEMBERS members (and, as every message, at most
`limits.max_message_bytes`); a whole stream at most `limits.max_stream_tasks` tasks, which the
server holds until the commit. Members are checked at the commit, as Submit checks a workflow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from conveyor.v1 import task_service_pb2, workflow_pb2

from ..config import Limits
from .canvas.signatures import all_signatures
from .errors import InvalidArgument

# Members in one `members` message: bounds what the server parses and copies per piece.
MAX_PIECE_MEMBERS = 1_000

Part = task_service_pb2.SubmitStreamRequest


class StreamedSubmission:
    """The open group of one stream: its opening request, with the members received so far."""

    def __init__(self, opening: task_service_pb2.SubmitRequest, limits: Limits) -> None:
        kind = opening.workflow.WhichOneof("kind") if opening.HasField("workflow") else None
        if kind == "group":
            self._group = opening.workflow.group
        elif kind == "chord":
            self._group = opening.workflow.chord.header
        else:
            raise InvalidArgument(
                "open: a streamed submission's workflow must be a group or a chord (its members are streamed)",
                field="open.workflow",
            )
        self.request = opening
        self.max_tasks = limits.max_stream_tasks
        self.received = 0
        self._tasks = sum(1 for _ in all_signatures(opening))

    def add(self, members: Sequence[workflow_pb2.Workflow]) -> None:
        if len(members) > MAX_PIECE_MEMBERS:
            raise InvalidArgument(
                f"members: a piece holds at most {MAX_PIECE_MEMBERS} members, not {len(members)}",
                field="members.members",
            )
        # Counted as they come, so that an oversized stream ends before the server holds it all.
        self._tasks += sum(1 for member in members for _ in all_signatures(member))
        if self._tasks > self.max_tasks:
            raise InvalidArgument(
                f"members: the stream holds more than {self.max_tasks} tasks "
                "(max_stream_tasks; callbacks count as tasks)"
            )
        self._group.members.extend(members)
        self.received += len(members)

    def commit(self, commit: task_service_pb2.SubmitStreamCommit) -> None:
        """Seal the group: `request` then holds every member."""
        if commit.member_count != self.received:
            raise InvalidArgument(
                f"commit: member_count is {commit.member_count}, but {self.received} members were received; "
                "nothing was submitted",
                field="commit.member_count",
            )


async def receive(parts: AsyncIterator[Part], limits: Limits) -> StreamedSubmission:
    """Read a stream up to its commit: the sealed submission (its `request` is ready to submit).
    Raises InvalidArgument for parts out of order, TimeoutError when the client stays silent for
    `limits.stream_idle_seconds`."""
    submission: StreamedSubmission | None = None
    while True:
        try:
            async with asyncio.timeout(limits.stream_idle_seconds):
                part = await anext(parts)
        except StopAsyncIteration:
            raise InvalidArgument("the stream ended without a commit; nothing was submitted") from None
        which = part.WhichOneof("part")
        if which == "open":
            if submission is not None:
                raise InvalidArgument("open: a stream opens once, with its first message", field="open")
            submission = StreamedSubmission(part.open, limits)
        elif submission is None:
            raise InvalidArgument("the first message of a stream must be an open", field="open")
        elif which == "members":
            submission.add(part.members.members)
        elif which == "commit":
            submission.commit(part.commit)
            return submission
        else:
            raise InvalidArgument("a stream message must set open, members or commit", field="part")
