"""Engine URLs: the options Conveyor reads from a broker's or backend's query string.

An engine URL carries Conveyor's options (`prefix` on every networked engine, and each
engine's own, listed in its from_url docstring) beside its client library's. `EngineUrl` reads
them; `without()` gives the URL for the client library, which must not see Conveyor's:
redis-py passes unknown parameters to connections and pymongo rejects unknown URI options.

An option given twice takes its last value; an empty value means the default.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

# Namespace of every key, queue and collection name an engine creates, unless `prefix` is given.
DEFAULT_PREFIX = "conveyor"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
T = TypeVar("T")


class UrlOptionError(ValueError):
    """An option in an engine URL's query string has a value of the wrong type."""


class EngineUrl:
    def __init__(self, url: str) -> None:
        self.parts: SplitResult = urlsplit(url)
        self._query = parse_qsl(self.parts.query, keep_blank_values=True)

    def _value(self, name: str) -> str | None:
        values = [value for key, value in self._query if key == name and value]
        return values[-1] if values else None

    def _invalid(self, name: str, value: str, expected: str) -> UrlOptionError:
        # The scheme, not the URL: the URL may hold a password.
        return UrlOptionError(f"{self.parts.scheme}:// URL option {name}={value!r} must be {expected}")

    def text(self, name: str, default: str) -> str:
        value = self._value(name)
        return default if value is None else value

    def integer(self, name: str, default: int) -> int:
        return self._converted(name, default, int, "a whole number")

    def number(self, name: str, default: float) -> float:
        return self._converted(name, default, float, "a number")

    def _converted(self, name: str, default: T, convert: Callable[[str], T], expected: str) -> T:
        value = self._value(name)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            raise self._invalid(name, value, expected) from None

    def flag(self, name: str, default: bool) -> bool:
        value = self._value(name)
        if value is None:
            return default
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise self._invalid(name, value, f"one of {', '.join(sorted(_TRUE | _FALSE))}")

    @property
    def prefix(self) -> str:
        return self.text("prefix", DEFAULT_PREFIX)

    def given(self) -> set[str]:
        """The names of the options in the query string, lower-cased."""
        return {key.lower() for key, _ in self._query}

    def query_without(self, names: Collection[str], extra: list[tuple[str, str]] | None = None) -> str:
        """The query string less the options in `names`, with `extra` options appended."""
        return urlencode([(key, value) for key, value in self._query if key not in names] + (extra or []))

    def without(self, names: Collection[str], extra: list[tuple[str, str]] | None = None) -> str:
        """The URL less the options in `names` (Conveyor's), for the client library."""
        return urlunsplit(self.parts._replace(query=self.query_without(names, extra)))


def split_prefix(url: str) -> tuple[str, str]:
    """(the URL without `prefix`, the prefix): for engines whose only own option is `prefix`."""
    parsed = EngineUrl(url)
    return parsed.without({"prefix"}), parsed.prefix
