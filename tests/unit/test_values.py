import math

import pytest

from conveyor.errors import UnencodableValue
from conveyor.values import from_value, to_jsonable, to_value

ROUND_TRIPS = [
    0, -1, 2**63 - 1, -(2**63), 1.5, -0.0, math.inf, "", "héllo", True, False, b"", bytes(range(256)),
    None, [1, "a", None, [2.5]], {"k": {"nested": [True]}},
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=repr)
def test_round_trip_is_lossless(value: object) -> None:
    assert from_value(to_value(value)) == value
    assert type(from_value(to_value(value))) is type(value)


def test_bool_is_not_an_int() -> None:
    assert to_value(True).WhichOneof("kind") == "bool_value"
    assert to_value(1).WhichOneof("kind") == "int_value"


def test_out_of_range_int_and_unencodable_objects_are_refused() -> None:
    with pytest.raises(UnencodableValue, match="int64"):
        to_value(2**64)
    with pytest.raises(UnencodableValue, match="object"):
        to_value(object())


def test_jsonable_form_of_bytes() -> None:
    assert to_jsonable(to_value(b"\x00\xff")) == {"$bytes": "AP8="}
    assert to_jsonable(to_value([1, 2])) == [1, 2]
