"""How the processes pool and each of its children talk: one socket pair per child, carrying
frames, plus four numbers in shared memory.

A frame is a 4-byte big-endian length and a pickled list of messages: whatever is ready goes
out together, so one write carries many tasks or many results.

    parent -> child   ("run", seq, serialized Assignment)   run it after those sent before
                      ("skip", seq)                          do not start it (cancel, drain)
                      ("exit",)                              finish what was sent, then exit
    child -> parent   ("ready",)                             up: send me tasks
                      ("done", seq, Ending)
                      ("skipped", seq)
                      ("progress", seq, value)
                      ("retire", reason)                     replace me (memory limit)

Shared memory (a RawArray of doubles) lets the parent see what the child is doing without a
message per task: the child writes STARTED_AT (time.monotonic(), one clock for every process on
the machine) then STARTED_SEQ when it starts a task, and FINISHED_SEQ when it ends one. The
parent writes STOP_REASON before it sends SIGTERM, so that the child knows the signal is the
pool's (a SIGTERM to the whole process group is the worker's to handle, not the child's).
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
Message = tuple[Any, ...]

STARTED_SEQ, STARTED_AT, FINISHED_SEQ, STOP_REASON = range(4)
SHARED_SLOTS = 4
# STOP_REASON values; 0 is none.
STOP_TIME_LIMIT, STOP_CANCEL, STOP_SHUTDOWN = 1.0, 2.0, 3.0


def frame(messages: list[Message]) -> bytes:
    payload = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Cuts a byte stream into frames, however the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[Message]]:
        buffer = self._buffer
        buffer += data
        frames: list[list[Message]] = []
        offset = 0
        with memoryview(buffer) as view:
            while len(buffer) - offset >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer, offset)
                end = offset + HEADER.size + size
                if end > len(buffer):
                    break
                frames.append(pickle.loads(view[offset + HEADER.size:end]))
                offset = end
        if offset:
            del buffer[:offset]
        return frames


def receive(sock: socket.socket) -> list[Message]:
    """Block until one whole frame arrives (the child's side). EOFError when the parent is gone."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    return pickle.loads(_exactly(sock, size))  # type: ignore[no-any-return]


def _exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    with memoryview(data) as view:
        got = 0
        while got < size:
            count = sock.recv_into(view[got:])
            if count == 0:
                raise EOFError("the worker process closed its end")
            got += count
    return data


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
