"""Scenario errors, YAML line mapping and JSON Schema checking.

A scenario error names the file, the line and the key path (``arms[1].client``). Lines
come from composing the YAML to nodes once: the node marks give the line of every key and
sequence item, so an error found on the parsed data can point back into the file.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

KeyPath = tuple[str | int, ...]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "scenarios" / "scenario.schema.json"


def format_path(path: Sequence[str | int]) -> str:
    """Render a key path as ``arms[1].client.concurrency`` (``<root>`` when empty)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a scenario: where (file, 1-based line, key path) and what."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ScenarioError(ValueError):
    """A scenario that cannot be used; ``str()`` lists ``file:line: key.path: message``."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class LineMap:
    """Key path -> 1-based line number of one YAML document, from its composed nodes."""

    def __init__(self, file: str, lines: Mapping[KeyPath, int]) -> None:
        self.file = file
        self._lines = dict(lines)

    @classmethod
    def from_text(cls, file: str, text: str) -> LineMap:
        """Compose ``text`` (safe loader, no objects built) and record every key's line."""
        lines: dict[KeyPath, int] = {(): 1}
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            lines[()] = node.start_mark.line + 1
            _walk(node, (), lines)
        return cls(file, lines)

    def has(self, path: Sequence[str | int]) -> bool:
        """True when ``path`` itself appears in the file."""
        return tuple(path) in self._lines

    def line(self, path: Sequence[str | int]) -> int:
        """Line of ``path``, or of its nearest ancestor present in the file."""
        key = tuple(path)
        while key not in self._lines and key:
            key = key[:-1]
        return self._lines.get(key, 1)

    def problem(self, path: Sequence[str | int], message: str) -> Problem:
        """A :class:`Problem` located at ``path``."""
        return Problem(self.file, self.line(path), format_path(path), message)


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _walk(item, child, lines)


def read_yaml(path: Path, file: str | None = None) -> tuple[Any, LineMap]:
    """Read a YAML file with ``yaml.safe_load`` and its line map; bad syntax is a ScenarioError."""
    name = file or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(
            [Problem(name, 1, "<root>", f"cannot read file: {exc.strerror}")]
        ) from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ScenarioError([Problem(name, line, "<root>", f"not UTF-8 text: {exc.reason}")]
                            ) from exc
    try:
        data = yaml.safe_load(text)
        lines = LineMap.from_text(name, text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ScenarioError(
            [Problem(name, line, "<root>", f"invalid YAML: {exc.problem}")]
        ) from exc
    except yaml.YAMLError as exc:
        raise ScenarioError([Problem(name, 1, "<root>", f"invalid YAML: {exc}")]) from exc
    return data, lines


@cache
def scenario_schema() -> Mapping[str, Any]:
    """The scenario JSON Schema shipped in ``scenarios/scenario.schema.json``."""
    with SCHEMA_PATH.open(encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def schema_problems(data: Any, lines: LineMap) -> list[Problem]:
    """Check ``data`` against the scenario schema; one located problem per violation."""
    validator = jsonschema.Draft202012Validator(scenario_schema())
    # NaN passes every bound the schema sets (each comparison is false) and YAML spells it
    # .nan; no setting means anything at .inf either: refused here, wherever they are
    odd = {path: value for path, value in _non_finite(data, ())}
    problems = [lines.problem(path, f"expected a finite number, got {value}")
                for path, value in odd.items()]
    seen: set[tuple[int, str, str]] = set()
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        if tuple(error.absolute_path) in odd:
            continue
        for path, message in _explain(error):
            problem = lines.problem(path, message)
            key = (problem.line, problem.path, problem.message)
            if key not in seen:
                seen.add(key)
                problems.append(problem)
    return problems


def _non_finite(data: Any, path: KeyPath) -> Iterator[tuple[KeyPath, float]]:
    """Each NaN or infinite float in ``data``, with its key path."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, (*path, str(key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _non_finite(value, (*path, index))


def _explain(error: ValidationError) -> Iterator[tuple[KeyPath, str]]:
    """Turn one jsonschema error into (path, message) pairs a person can act on."""
    if error.validator in ("oneOf", "anyOf") and error.context:
        yield from _explain(best_match(error.context))
        return
    path: KeyPath = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        allowed = sorted(schema.get("properties", {}))
        for key in sorted(set(error.instance) - set(allowed)):
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            yield (*path, str(key)), f"unknown key{did_you_mean}; allowed: {', '.join(allowed)}"
        return
    if error.validator == "required":
        yield path, error.message.replace("is a required property", "is required")
        return
    if error.validator == "not" and error.schema == {"required": ["overrides"]}:
        yield (*path, "overrides"), "overrides need a profile to apply to"
        return
    if error.validator == "type":
        yield path, f"expected {error.validator_value}, got {_type_name(error.instance)}"
        return
    if error.validator == "enum":
        choices = ", ".join(repr(v) for v in error.validator_value)
        yield path, f"{error.instance!r} is not one of {choices}"
        return
    yield path, error.message


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__
