"""Typed YAML mapping access; errors name the file, the key path and the expectation."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_MISSING = object()


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names file, key path, expectation."""


def fail(source: str, path: str, expected: str, got: object = _MISSING) -> ConfigError:
    """Build the ConfigError for ``path`` in ``source``."""
    where = f"{source}: {path or '<top>'}"
    if got is _MISSING:
        return ConfigError(f"{where}: expected {expected}")
    return ConfigError(f"{where}: expected {expected}, got {got!r}")


class Section:
    """A mapping at ``path`` in ``source``; every getter validates and names the key on error."""

    __slots__ = ("data", "path", "source")

    def __init__(self, data: object, source: str, path: str, allowed: Iterable[str] | None = None):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise fail(source, path, "a mapping", data)
        for key in data:
            if not isinstance(key, str):
                raise fail(source, path, "string keys", key)
        self.data: dict[str, object] = data
        self.source = source
        self.path = path
        if allowed is not None:
            allowed = set(allowed)
            for key in data:
                if key not in allowed:
                    raise fail(
                        source, self.key(key), "one of the keys " + ", ".join(sorted(allowed))
                    )

    def key(self, name: str) -> str:
        """The dotted path of ``name`` in this section."""
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        """Whether the key is present (and not null)."""
        return self.data.get(name) is not None

    def raw(self, name: str, default: object = None) -> object:
        """The unvalidated value of ``name``."""
        return self.data.get(name, default)

    def sub(self, name: str, allowed: Iterable[str] | None = None) -> Section:
        """The nested mapping ``name`` (empty when absent)."""
        return Section(self.data.get(name), self.source, self.key(name), allowed)

    def error(self, name: str, expected: str, got: object = _MISSING) -> ConfigError:
        """A ConfigError for key ``name`` of this section."""
        return fail(self.source, self.key(name), expected, got)

    def number(self, name: str, default: float | None = None, *, minimum: float | None = None,
               maximum: float | None = None, positive: bool = False) -> float:
        """A finite number (int or float), within the given bounds."""
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise self.error(name, "a number (required)")
            return default
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value)):
            raise self.error(name, "a number", value)
        if positive and value <= 0:
            raise self.error(name, "a number > 0", value)
        if minimum is not None and value < minimum:
            raise self.error(name, f"a number >= {minimum:g}", value)
        if maximum is not None and value > maximum:
            raise self.error(name, f"a number <= {maximum:g}", value)
        return float(value)

    def opt_number(self, name: str, *, minimum: float | None = 0.0) -> float | None:
        """A number >= ``minimum``, or None when absent."""
        if self.data.get(name) is None:
            return None
        return self.number(name, minimum=minimum)

    def rate(self, name: str) -> float:
        """A probability in [0, 1], 0 when absent."""
        return self.number(name, 0.0, minimum=0.0, maximum=1.0)

    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
        """An integer >= ``minimum``."""
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise self.error(name, "an integer (required)")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, "an integer", value)
        if minimum is not None and value < minimum:
            raise self.error(name, f"an integer >= {minimum}", value)
        return value

    def opt_integer(self, name: str, *, minimum: int = 0) -> int | None:
        """An integer >= ``minimum``, or None when absent."""
        if self.data.get(name) is None:
            return None
        return self.integer(name, minimum=minimum)

    def boolean(self, name: str, default: bool) -> bool:
        """A boolean (true/false)."""
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, "true or false", value)
        return value

    def string(self, name: str, default: str | None = None, *,
               choices: Iterable[str] | None = None) -> str:
        """A non-empty string, one of ``choices`` when given."""
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise self.error(name, "a string (required)")
            return default
        if not isinstance(value, str) or not value:
            raise self.error(name, "a non-empty string", value)
        if choices is not None:
            options = list(choices)
            if value not in options:
                raise self.error(name, "one of " + ", ".join(options), value)
        return value

    def seq(self, name: str) -> list[object]:
        """A list (empty when absent)."""
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(name, "a list", value)
        return value
