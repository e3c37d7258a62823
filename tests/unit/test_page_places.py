"""Page tokens as places (core/page_tokens.py): every place comes back from its token, whatever
letter its base64 ends with."""

from __future__ import annotations

import string

import pytest

from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.page_tokens import decode_place, encode_place


@pytest.mark.parametrize("at_us", [1, 1_700_000_000_123_456])
def test_every_one_letter_key_comes_back_from_its_token_whatever_its_last_base64_letter(at_us: int) -> None:
    # Their tokens end in many base64 letters (key "W" in "X": it is not mistaken for padding).
    for key in string.ascii_letters + string.digits + "-_.:":
        token = encode_place(at_us, key)
        assert decode_place(token) == (at_us, key), token


def test_a_token_with_a_character_outside_base64url_is_refused() -> None:
    token = encode_place(1, "key")
    for edited in (token[:2] + "!" + token[2:], token + "+", token.replace(token[0], "/", 1)):
        with pytest.raises(InvalidArgument, match="page_token is not one this server gave out"):
            decode_place(edited)
