"""The one walk over a submission's signatures: every task it holds (chain steps, group and chord
members, chord callbacks, a map's task) and every callback list at any depth (a task's links, a
chain's, a group's, a chord header's), each with where it sits and whether it receives a previous
result. Signatures are references, so callers may change them in place.

What each kind holds is listed once, in `_parts` (an exhaustive match: mypy names it when a kind
is added). tests/unit/test_signature_walk.py fails when a canvas message gains a Signature or
Workflow field that the walk does not visit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, assert_never

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2

from .kinds import Kind, workflow_kind

Holder = task_service_pb2.SubmitRequest | workflow_pb2.Workflow | task_pb2.Signature


class Placed(NamedTuple):  # not a frozen dataclass: one is made per task of every submit (2x faster)
    """One signature of a submission."""

    signature: task_pb2.Signature
    # Where it sits, e.g. request.workflow.group.on_member_error[0] (with where="request").
    where: str
    # It receives a previous result (or error) as its first arg: a chain step after the first,
    # a chord callback, every callback and link; never an immutable signature.
    leading: bool
    # Set on a map's task: it is the template of chunk_count(map) chunk tasks, one call per item.
    map: workflow_pb2.Map | None = None


class _Node(NamedTuple):
    workflow: workflow_pb2.Workflow
    where: str
    leading: bool


def placed_signatures(message: Holder, where: str = "") -> Iterator[Placed]:
    """Depth first in message order (a node, then its callbacks), without recursion: a request
    is walked before its depth is checked, and may nest deeper than Python's stack."""
    stack: list[Placed | _Node]
    if isinstance(message, task_service_pb2.SubmitRequest):
        target = message.WhichOneof("target")
        if target == "task":
            stack = [_placed(message.task, f"{where}.task", leading=False)]
        elif target == "workflow":
            stack = [_Node(message.workflow, f"{where}.workflow", leading=False)]
        else:
            stack = []
    elif isinstance(message, workflow_pb2.Workflow):
        stack = [_Node(message, where, leading=False)]
    else:
        stack = [_placed(message, where, leading=False)]
    parts: list[Placed | _Node]
    while stack:
        top = stack.pop()
        if isinstance(top, Placed):
            yield top
            signature = top.signature
            if not signature.on_success and not signature.on_error:
                continue
            parts = [*_callbacks(signature.on_success, f"{top.where}.on_success"),
                     *_callbacks(signature.on_error, f"{top.where}.on_error")]
        else:
            parts = _parts(top)
        stack.extend(reversed(parts))


def all_signatures(message: Holder) -> Iterator[task_pb2.Signature]:
    """Every signature `message` holds, as placed_signatures finds them."""
    return (placed.signature for placed in placed_signatures(message))


def _parts(node: _Node) -> list[Placed | _Node]:
    """What a workflow node holds, in order: its children, then its callback lists."""
    workflow, where, leading = node
    kind = workflow_kind(workflow)
    match kind:
        case Kind.TASK:
            return [_placed(workflow.task, where, leading)]
        case Kind.CHAIN:
            chain = workflow.chain
            steps = [_child(step, f"{where}.chain[{i}]", leading or i > 0) for i, step in enumerate(chain.steps)]
            return [*steps, *_callbacks(chain.on_error, f"{where}.chain.on_error"),
                    *_callbacks(chain.on_success, f"{where}.chain.on_success")]
        case Kind.GROUP:
            return _group(workflow.group, f"{where}.group", leading)
        case Kind.CHORD:
            chord = workflow.chord
            return [*_group(chord.header, f"{where}.chord.header", leading),
                    _child(chord.callback, f"{where}.chord.callback", leading=True)]
        case Kind.MAP:
            # Its chunk tasks are immutable: a previous result never reaches them.
            return [Placed(workflow.map.task, f"{where}.map.task", leading=False, map=workflow.map)]
        case None:
            return []
        case _:
            assert_never(kind)


def _group(group: workflow_pb2.Group, where: str, leading: bool) -> list[Placed | _Node]:
    members = [_child(member, f"{where}[{i}]", leading) for i, member in enumerate(group.members)]
    return [*members, *_callbacks(group.on_error, f"{where}.on_error"),
            *_callbacks(group.on_success, f"{where}.on_success"),
            *_callbacks(group.on_member_error, f"{where}.on_member_error")]


def _child(workflow: workflow_pb2.Workflow, where: str, leading: bool) -> Placed | _Node:
    """A child node, or at once the signature of a task child (most are: one step less each)."""
    if workflow_kind(workflow) is Kind.TASK:
        return _placed(workflow.task, where, leading)
    return _Node(workflow, where, leading)


def _callbacks(signatures: Sequence[task_pb2.Signature], where: str) -> list[Placed]:
    return [_placed(signature, f"{where}[{i}]", leading=True) for i, signature in enumerate(signatures)]


def _placed(signature: task_pb2.Signature, where: str, leading: bool) -> Placed:
    return Placed(signature, where, leading and not signature.immutable)
