"""Server-Sent Events: a response that streams what a source emits, with keep-alive comments,
ending when the client leaves or the server stops.

A source is a coroutine that calls `emit(event, data)` for as long as it likes; it runs as its
own task, so a slow source never holds the stream and the stream's end cancels the source.
An exception from the source is sent as an `error` event (the JSON error body) and ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from .errors import response_for

Emit = Callable[[str, Any], Awaitable[None]]
Source = Callable[[Emit], Awaitable[None]]
KEEPALIVE_SECONDS = 15.0
# The browser reconnects this long after a stream ends (EventSource's `retry`).
RETRY_MS = 2000
BACKLOG = 64


def _frame(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(source: Source, stopping: asyncio.Event) -> AsyncIterator[str]:
    frames: asyncio.Queue[str | None] = asyncio.Queue(BACKLOG)

    async def emit(event: str, data: Any) -> None:
        await frames.put(_frame(event, data))

    async def run() -> None:
        try:
            await source(emit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            body = json.loads(bytes(response_for(exc, "event stream").body))
            await frames.put(_frame("error", body))
        await frames.put(None)

    feeder = asyncio.create_task(run())
    stop = asyncio.create_task(stopping.wait())
    frame: asyncio.Task[str | None] | None = None
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            frame = asyncio.create_task(frames.get())
            done, _ = await asyncio.wait({frame, stop}, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            if frame not in done:
                frame.cancel()
                if stop in done:
                    return
                yield ": keep-alive\n\n"
                continue
            text = frame.result()
            if text is None:
                return
            yield text
    finally:
        # A client that leaves closes the stream while it waits for a frame: that wait goes too.
        pending: list[asyncio.Task[Any]] = [task for task in (feeder, stop, frame) if task is not None]
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)


def event_stream(source: Source, stopping: asyncio.Event) -> StreamingResponse:
    return StreamingResponse(
        _stream(source, stopping), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
