"""The checks of single values, shared by every parser of operator input: config.yaml, teams.yaml and
the admin API's JSON bodies.

A check takes a raw value and returns it typed, or raises ValueError whose text says what was
expected ("a whole number from 1 to 64"); the caller adds where (file and path, or the JSON field).
Checks are strict about types, as JSON is: `"5"` is not a number. YAML's leniency (values from
`os.environ/`, quoted numbers) lives in one place, `yamlpath.Node.scalar_of`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]
MAX_EXACT_INT = 2**53  # the largest whole number a JSON reader anywhere keeps exactly


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def non_empty_string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("a non-empty string")
    return v


def optional_string(v: Any) -> str | None:
    return None if v is None else string(v)


def printable_text(max_length: int) -> Check:
    """Printable text of 1 to `max_length` characters, trimmed."""

    def check(v: Any) -> str:
        if not isinstance(v, str) or not v.strip() or len(v) > max_length or not v.isprintable():
            raise ValueError(f"printable text of 1 to {max_length} characters")
        return v.strip()

    return check


def number(v: Any) -> float:
    """A finite number (NaN and infinity are refused: no limit or price means them)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("a number")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("a finite number")
    return float(v)


def positive_number(v: Any) -> float:
    n = number(v)
    if n <= 0:
        raise ValueError("a number greater than 0")
    return n


def non_negative_number(v: Any) -> float:
    n = number(v)
    if n < 0:
        raise ValueError("a number of 0 or more")
    return n


def whole(v: Any) -> int:
    """A whole number; 5.0 counts as 5."""
    if isinstance(v, bool):
        raise ValueError("a whole number")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError("a whole number")


def whole_in(low: int, high: int) -> Check:
    def check(v: Any) -> int:
        try:
            n = whole(v)
        except ValueError:
            n = low - 1
        if not low <= n <= high:
            raise ValueError(f"a whole number from {low} to {high}")
        return n

    return check


def positive_whole(v: Any) -> int:
    n = whole(v)
    if n <= 0:
        raise ValueError("a whole number greater than 0")
    return n


def non_negative_whole(v: Any) -> int:
    n = whole(v)
    if n < 0:
        raise ValueError("a whole number of 0 or more")
    return n


def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v
