"""Page tokens: an opaque place in a list ordered by (a time in microseconds, an id).

A token is the place of the last item of a page; the next page starts after it. Clients pass
next_page_token back unchanged; anything else is refused with InvalidArgument.
"""

from __future__ import annotations

import base64
import binascii
import re

from .errors import InvalidArgument

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def encode_place(at_us: int, key: str) -> str:
    return base64.urlsafe_b64encode(f"{at_us}:{key}".encode()).decode().rstrip("=")


def decode_place(token: str) -> tuple[int, str]:
    try:
        if not _BASE64URL.fullmatch(token):
            raise ValueError("not base64url")  # base64 would skip the stray characters
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        at, _, key = text.partition(":")
        return int(at), key
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not one this server gave out (pass next_page_token unchanged)") from None
