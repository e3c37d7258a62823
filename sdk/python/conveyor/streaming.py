"""Streamed submits: a group (or a chord's header) built from a generator with more members than
one piece goes to the server in pieces over TaskService.SubmitStream (open, members...,
commit), so that neither the client nor one message ever holds every member (a smaller one
goes as one Submit, as a list does). The server accepts the group only at the commit: an
abandoned stream submits nothing. docs/canvas.md ("Generator groups") has the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import chain, islice

from conveyor.canvas import MAX_DEPTH, Canvas, Chord, Group, depth_of
from conveyor.v1 import task_service_pb2, workflow_pb2

# Members per piece: the server's limit (core/streamed.py MAX_PIECE_MEMBERS).
PIECE_MEMBERS = 1_000
# A piece is sent once its members take this much, well under the server's message limit.
PIECE_BYTES = 4 * 1024 * 1024

Prepare = Callable[[workflow_pb2.Workflow], None]


def streamed_group(target: object) -> Group | None:
    """The lazy group that a submit of `target` streams: a lazy group at the root, or a root
    chord's lazy header; None when `target` goes as one message."""
    if isinstance(target, Group) and target.lazy is not None:
        return target
    if isinstance(target, Chord) and target.header.lazy is not None:
        return target.header
    return None


def read_head(target: Group | Chord) -> Group | Chord:
    """`target` with the first members of its lazy group read: when they are all (a piece or
    fewer), a plain canvas that goes as one Submit, as a list would (with its task_ids, and
    retried); else one that still streams, from those members on."""
    lazy = streamed_group(target)
    if lazy is None or lazy.lazy is None:
        return target
    members = iter(lazy.lazy)
    head = list(islice(members, PIECE_MEMBERS + 1))
    if len(head) <= PIECE_MEMBERS:
        read = replace(lazy, members=(*lazy.members, *head), lazy=None)
    else:
        read = replace(lazy, lazy=chain(head, members))
    return replace(target, header=read) if isinstance(target, Chord) else read


def opening(target: Group | Chord) -> workflow_pb2.Workflow:
    """The canvas without its lazy members: what the stream's open message carries."""
    if isinstance(target, Chord):
        return replace(target, header=replace(target.header, lazy=None)).to_workflow()
    return replace(target, lazy=None).to_workflow()


def member_depth(target: Group | Chord) -> int:
    """The depth of the streamed members in the canvas (the root is 1), as the server counts."""
    return 3 if isinstance(target, Chord) else 2


def pieces(members: Iterable[Canvas], depth: int, prepare: Prepare) -> Iterator[task_service_pb2.SubmitStreamMembers]:
    """The members in pieces of at most PIECE_MEMBERS members and about PIECE_BYTES, each
    member read from `members` only when its piece is being built. `prepare` fills in a
    member's ids; a member nesting past MAX_DEPTH at `depth` is refused here (ValueError)."""
    piece = task_service_pb2.SubmitStreamMembers()
    size = 0
    for index, member in enumerate(members):
        if depth_of(member, MAX_DEPTH) + depth - 1 > MAX_DEPTH:
            raise ValueError(f"member {index} of the streamed group nests more than {MAX_DEPTH} levels deep")
        workflow = piece.members.add()
        workflow.CopyFrom(member.to_workflow())
        prepare(workflow)
        size += workflow.ByteSize()
        if len(piece.members) >= PIECE_MEMBERS or size >= PIECE_BYTES:
            yield piece
            piece = task_service_pb2.SubmitStreamMembers()
            size = 0
    if piece.members:
        yield piece
