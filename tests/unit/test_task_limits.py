"""Submit-side limits on one signature: headers, the whole task, soft and hard time limits and
the parent id, each refused with a message that says what is over and by how much."""

from __future__ import annotations

import pytest

from conveyor import sig
from conveyor_server.config import Limits
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.validation import MAX_HEADERS_BYTES, check_signature, max_task_bytes

LIMITS = Limits()


def test_headers_may_take_64_kib_and_not_a_byte_more() -> None:
    key = "k"
    check_signature(sig("t").set(headers={key: "x" * (MAX_HEADERS_BYTES - len(key))}).to_proto(), LIMITS)
    with pytest.raises(InvalidArgument, match=r"^task: headers are 64.0 KiB, over the 64 KiB limit$"):
        check_signature(sig("t").set(headers={key: "x" * (MAX_HEADERS_BYTES - len(key) + 1)}).to_proto(), LIMITS)
    with pytest.raises(InvalidArgument, match=r"headers are 10.0 MiB, over the 64 KiB limit"):
        check_signature(sig("t").set(headers={"big": "x" * (10 * 2**20)}).to_proto(), LIMITS)


def test_the_whole_task_callbacks_included_is_limited() -> None:
    assert max_task_bytes(LIMITS) == 2**20 + 128 * 1024
    half = b"x" * (600 * 1024)
    check_signature(sig("t", half).to_proto(), LIMITS)
    with pytest.raises(InvalidArgument, match=r"the whole task \(args, headers and callbacks\) is 1.2 MiB, over the "
                                              r"1.1 MiB limit"):
        check_signature(sig("t", half).link(sig("u", half)).to_proto(), LIMITS)


@pytest.mark.parametrize(("options", "message"), [
    ({"soft_time_limit": -1.0}, "soft_time_limit is negative"),
    ({"time_limit": 2.0, "soft_time_limit": 3.0},
     r"soft_time_limit \(3 s\) must be below time_limit \(2 s\), which stops the task"),
    ({"time_limit": -1.0}, "time_limit is negative"),
])
def test_time_limits_that_cannot_work_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_signature(sig("t").set(**options).to_proto(), LIMITS)
    check_signature(sig("t").set(soft_time_limit=5.0).to_proto(), LIMITS)  # a soft limit alone is fine
    check_signature(sig("t").set(time_limit=5.0, soft_time_limit=4.0).to_proto(), LIMITS)


def test_a_parent_id_must_look_like_a_task_id() -> None:
    signature = sig("t").to_proto()
    signature.parent_id = "bad id with spaces"
    with pytest.raises(InvalidArgument, match="parent_id 'bad id with spaces' must be 1-128 of"):
        check_signature(signature, LIMITS)


def test_args_and_the_whole_task_may_reach_their_limits_exactly() -> None:
    limits = Limits(max_args_bytes=100)
    at_limit = sig("t", "x" * 98).to_proto()  # a string Value of 98 characters takes 100 bytes
    assert at_limit.args[0].ByteSize() == 100
    check_signature(at_limit, limits)
    with pytest.raises(InvalidArgument, match="args and kwargs take 101 bytes, over the limit of 100"):
        check_signature(sig("t", "x" * 99).to_proto(), limits)

    whole = sig("t").to_proto()
    whole.message_group = "g" * (max_task_bytes(limits) - whole.ByteSize() - 8)  # a field with no limit of its own
    while whole.ByteSize() < max_task_bytes(limits):
        whole.message_group += "g"
    assert whole.ByteSize() == max_task_bytes(limits)
    check_signature(whole, limits)
    whole.message_group += "g"
    with pytest.raises(InvalidArgument, match="the whole task"):
        check_signature(whole, limits)
