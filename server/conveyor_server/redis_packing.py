"""Redis connections that pack commands with hiredis's C packer instead of redis-py's Python one.

redis-py's sync client packs commands with `hiredis.pack_command` when hiredis is installed;
its asyncio client always packs in Python, re-joining the growing buffer once per argument. The
server's commands carry batches (an EVALSHA with a record per task of the batch), so packing was
about a twentieth of the server's CPU per task under load: 78 µs in Python against 13 µs in C
for an EVALSHA of 29 keys and 59 values (bench/compare.py --matched profiles). The bytes sent are
the same; tests/unit/test_redis_packing.py compares them with redis-py's own packing.

Without hiredis, or with an encoding other than strict UTF-8 (hiredis encodes text as UTF-8
only), connections keep redis-py's packing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from hiredis import pack_command

ConnectionClass = TypeVar("ConnectionClass", bound=type[AbstractConnection])

_packing: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packing_in_c(connection_class: ConnectionClass) -> ConnectionClass:
    """`connection_class` with hiredis's packer (itself when hiredis is missing)."""
    if not HIREDIS_AVAILABLE or issubclass(connection_class, _HiredisPacking):
        return connection_class
    packing = _packing.get(connection_class)
    if packing is None:
        packing = type(f"HiredisPacking{connection_class.__name__}", (_HiredisPacking, connection_class), {})
        _packing[connection_class] = packing
    return cast(ConnectionClass, packing)


class _HiredisPacking(AbstractConnection):
    """The packing half of a connection class; `packing_in_c` puts it before the real one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        encoder = self.encoder
        self._packs_in_c = encoder.encoding.lower().replace("-", "") == "utf8" and encoder.encoding_errors == "strict"

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not self._packs_in_c:
            return super().pack_command(*args)
        first = args[0]
        # As redis-py: a command name with spaces ("SCRIPT LOAD") is several arguments.
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [pack_command(args)]  # type: ignore[arg-type]  # its stub types the tuple as one item
        except TypeError:
            # hiredis takes str, int, float, bytes and memoryview; redis-py takes bytearray
            # too, and refuses the rest (bool, None) with DataError, which callers expect.
            if any(isinstance(arg, bytearray) for arg in args):
                return self.pack_command(*(bytes(arg) if isinstance(arg, bytearray) else arg for arg in args))
            refused = next((arg for arg in args if isinstance(arg, bool)
                            or not isinstance(arg, str | int | float | bytes | memoryview)), None)
            raise DataError(f"Invalid input of type: '{type(refused).__name__}'. "
                            "Convert to a bytes, string, int or float first.") from None

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        return [b"".join(chunk for command in commands for chunk in self.pack_command(*command))]
