"""YAML values that know where they came from, so every config error can say file + path.

`os.environ/VAR` is resolved wherever a scalar is read, as LiteLLM does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import yaml

ENV_PREFIX = "os.environ/"


class ConfigError(Exception):
    """A config problem, told as `file: path: expected X, got Y; fix`."""

    def __init__(self, file: str, path: str, expected: str, fix: str = "", got: str | None = None):
        self.file, self.path, self.expected, self.fix, self.got = file, path, expected, fix, got
        where = f"{file}: {path}" if path else file
        msg = f"{where}: expected {expected}"
        if got is not None:
            msg += f", got {got}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class Node:
    """A value inside a YAML document, with its file and dotted path (`teams.team-a.keys[1]`)."""

    __slots__ = ("file", "path", "value")

    def __init__(self, file: str, path: str, value: Any):
        self.file, self.path, self.value = file, path, value

    # -- errors
    def error(self, expected: str, fix: str = "", key: str | None = None, show_value: bool = True) -> ConfigError:
        path = self._join(key) if key is not None else self.path
        got = None
        if show_value and key is None:
            got = _describe(self.value)
        return ConfigError(self.file, path, expected, fix, got)

    # -- navigation
    def _join(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else str(key)

    def expect_mapping(self) -> None:
        if not isinstance(self.value, dict):
            raise self.error("a mapping (key: value lines)", "check the indentation")

    def child(self, key: str) -> Node:
        self.expect_mapping()
        return Node(self.file, self._join(key), self.value.get(key))

    def get(self, key: str) -> Node | None:
        self.expect_mapping()
        if self.value.get(key) is None:
            return None
        return Node(self.file, self._join(key), self.value[key])

    def only_keys(self, allowed: set[str], expected: str | None = None, fix: str = "remove or rename it") -> None:
        """A mapping with no key outside `allowed`; the first stray key is the error's path."""
        unknown = self.unknown_keys(allowed)
        if unknown:
            raise ConfigError(self.file, unknown[0], expected or f"one of: {', '.join(sorted(allowed))}", fix)

    def unknown_keys(self, allowed: set[str]) -> list[str]:
        self.expect_mapping()
        return [self._join(str(k)) for k in self.value if k not in allowed]

    def mapping_items(self) -> Iterator[tuple[str, Node]]:
        self.expect_mapping()
        for k, v in self.value.items():
            if not isinstance(k, str):
                raise ConfigError(self.file, self._join(str(k)), "a string key", "quote the key")
            yield k, Node(self.file, self._join(k), v)

    def sequence_items(self) -> list[Node]:
        if not isinstance(self.value, list):
            raise self.error("a list (lines starting with `- `)")
        return [Node(self.file, self._join(i), v) for i, v in enumerate(self.value)]

    # -- scalars
    def scalar(self) -> Any:
        v = self.value
        if isinstance(v, str) and v.startswith(ENV_PREFIX):
            name = v[len(ENV_PREFIX):]
            if name not in os.environ:
                raise ConfigError(self.file, self.path, f"environment variable {name} to be set",
                                  f"export {name}=... before starting, or write the value in the file")
            return os.environ[name]
        return v

    def scalar_of(self, check: Callable[[Any], Any]) -> Any:
        """The scalar through a check of `scalars`; YAML's leniency is here: text that YAML would read as a
        number or boolean (an `os.environ/` value, a quoted "5") counts as one, and a number as its text."""
        v = self.scalar()
        try:
            return check(v)
        except ValueError as exc:
            for reading in _other_readings(v):
                try:
                    return check(reading)
                except ValueError:
                    pass
            raise ConfigError(self.file, self.path, str(exc), "", _describe(v, secret=self.value != v)) from None

    def req(self, key: str, check: Callable[[Any], Any]) -> Any:
        node = self.get(key)
        if node is None:
            raise ConfigError(self.file, self._join(key), "a value", f"add `{key}:`", "nothing")
        return node.scalar_of(check)

    def opt(self, key: str, check: Callable[[Any], Any], default: Any = None) -> Any:
        node = self.get(key)
        return default if node is None else node.scalar_of(check)


def _other_readings(v: Any) -> list[Any]:
    if isinstance(v, str):
        try:
            parsed = yaml.safe_load(v)
        except yaml.YAMLError:
            return []
        return [parsed] if isinstance(parsed, (bool, int, float)) else []
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [str(v)]
    return []


def _describe(v: Any, secret: bool = False) -> str:
    if secret:
        return "the value of its environment variable"
    if v is None:
        return "nothing"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_FILE_BYTES_ENV = "LLMGATE_MAX_CONFIG_BYTES"
MAX_FILE_BYTES = 1024 * 1024  # config.yaml and teams.yaml: 1 MiB unless LLMGATE_MAX_CONFIG_BYTES says otherwise
MAX_VALUES = 200_000  # values in a document once its aliases are expanded (a "billion laughs" has billions)


def max_file_bytes() -> int:
    raw = os.environ.get(MAX_FILE_BYTES_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else MAX_FILE_BYTES


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """yaml.safe_load's loader, refusing a key that appears twice in one mapping (which YAML would let the
    second one silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base constructor says so
                break
            if first is not key_node:
                raise _Duplicate(key, first.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep)


class _Duplicate(Exception):
    def __init__(self, key, first, second):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values the document holds once aliases are expanded, counted without expanding them; stops
    counting past `limit`. A recursive alias counts as past it."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in busy:
            return limit + 1
        busy.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        busy.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(node)


def load_yaml_file(path: str | os.PathLike[str]) -> Node:
    """Parse a YAML file into a Node; a missing file, bad syntax, a file over the size limit, a document whose
    aliases expand past MAX_VALUES values, or a key given twice is a ConfigError."""
    name = os.fspath(path)
    limit = max_file_bytes()
    try:
        with open(name, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(name, "", "a readable file", f"check the path ({exc.strerror})") from None
    if len(raw) > limit:
        raise ConfigError(name, "", f"a file of at most {limit:,} bytes",
                          f"make it smaller, or raise {MAX_FILE_BYTES_ENV}", got="a larger one")
    loader = _Loader(raw)
    try:
        document = loader.get_single_node()
        if document is not None and _expanded_size(document, MAX_VALUES) > MAX_VALUES:
            raise ConfigError(name, "", f"at most {MAX_VALUES:,} values once its aliases (*name) are expanded",
                              "write the values out, or use fewer aliases of aliases")
        value = loader.construct_document(document) if document is not None else None
    except _Duplicate as dup:
        raise ConfigError(name, f"line {dup.second.line + 1}", f"each key once in a mapping; `{dup.key}` is also on "
                          f"line {dup.first.line + 1}", "keep one of them (YAML would silently use the last)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(name, where, "valid YAML", f"fix the syntax ({problem})") from None
    finally:
        loader.dispose()
    return Node(name, "", {} if value is None else value)
