"""Random identifiers made in batches: one read of the system's random source for many.

`secrets.token_hex` and `uuid.uuid4` read it once per identifier, a system call each; dispatch
makes a lease token per task and the Redis broker a key per message, so a batch of tasks paid
one call per task for them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

TOKEN_BYTES = 16


def hex_tokens(count: int) -> Iterator[str]:
    """`count` tokens of 128 random bits each, in hex (as `secrets.token_hex(16)` makes them)."""
    drawn = secrets.token_bytes(TOKEN_BYTES * count)
    return (drawn[start:start + TOKEN_BYTES].hex() for start in range(0, len(drawn), TOKEN_BYTES))
