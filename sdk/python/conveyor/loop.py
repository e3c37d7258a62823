"""The event loop Conveyor's own processes run on (the server, `conveyor worker`, the CLI).

uvloop when it is installed (`pip install 'conveyor[fast]'`): its sockets and callbacks cost
less per round trip, which a server making several broker and backend calls per task feels.
`CONVEYOR_EVENT_LOOP=asyncio` keeps asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    choice = os.environ.get("CONVEYOR_EVENT_LOOP", "auto").strip().lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"CONVEYOR_EVENT_LOOP must be auto, uvloop or asyncio, not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional, from the `fast` extra
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)
