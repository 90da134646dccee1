"""Typed access to configuration mappings, with errors naming the source and key path."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the file and key path."""


def load_yaml(path: str | Path) -> object:
    """The data of a YAML file (``yaml.safe_load``); a file that cannot be read or is not
    YAML is a ConfigError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{yaml_error(exc)}") from exc


def yaml_error(exc: yaml.YAMLError) -> str:
    """What follows the file's name in the message of a YAML syntax error: the line when
    the parser marked one, then the problem alone (PyYAML's own text quotes the source
    as "<unicode string>" over several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}" if mark is not None else ""
        return f"{where}: not valid YAML: {exc.problem}"
    return f": not valid YAML: {exc}"


class Reader:
    """Typed access to one mapping, raising ConfigError with ``source: key.path``."""

    def __init__(self, data: object, source: str, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {path or '<root>'}: expected a mapping")
        self.data = data
        self.source = source
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, expected: str) -> ConfigError:
        got = self.data.get(name)
        return ConfigError(f"{self.source}: {self.key(name)}: expected {expected}, got {got!r}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> object:
        self.seen.add(name)
        return self.data.get(name)

    def str_(self, name: str, default: str | None = None) -> str:
        value = self.raw(name)
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(name, "a non-empty string")
        return value

    def opt_str(self, name: str) -> str | None:
        if self.raw(name) is None:
            return None
        return self.str_(name)

    def int_(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(name, f"an integer >= {minimum}")
        return value

    def opt_int(self, name: str, minimum: int = 1) -> int | None:
        if self.raw(name) is None:
            return None
        return self.int_(name, 0, minimum)

    def float_(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        # NaN passes every comparison, and no setting means anything at infinity
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < minimum):
            raise self.fail(name, f"a finite number >= {minimum}")
        return float(value)

    def opt_float(self, name: str) -> float | None:
        if self.raw(name) is None:
            return None
        return self.float_(name, 0.0)

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, "true or false")
        return value

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value not in options:
            raise self.fail(name, "one of " + ", ".join(options))
        return str(value)

    def child(self, name: str) -> Reader:
        value = self.raw(name)
        return Reader({} if value is None else value, self.source, self.key(name))

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.seen)
        if unknown:
            raise ConfigError(f"{self.source}: {self.key(unknown[0])}: unknown key")
