"""The one dispatch from a node kind to the module that implements it."""

from __future__ import annotations

from typing import assert_never

from .base import PlanNode, Primitive
from .chain import CHAIN
from .chord import CHORD
from .group import GROUP
from .kinds import Kind, kind_of
from .map import MAP
from .task import TASK


def primitive(kind: Kind) -> Primitive:
    match kind:
        case Kind.TASK:
            return TASK
        case Kind.CHAIN:
            return CHAIN
        case Kind.GROUP:
            return GROUP
        case Kind.CHORD:
            return CHORD
        case Kind.MAP:
            return MAP
        case _:
            assert_never(kind)


def primitive_of(node: PlanNode) -> Primitive:
    return primitive(kind_of(node))
