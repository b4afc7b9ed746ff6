"""Tests of plain values, shared by the checks across llm. Python's bool is an int, but True is
never a count of tokens nor a temperature: neither test takes it."""

from __future__ import annotations

import math


def is_whole_number(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float (NaN and infinities too: compare to refuse them), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_finite(value: object) -> bool:
    """A number above zero and below infinity (not NaN), not a bool."""
    return is_number(value) and 0 < value < math.inf  # type: ignore[operator]


def is_probability_below_one(value: object) -> bool:
    """A number in [0, 1), such as a dropout rate (dropping everything trains nothing)."""
    return is_number(value) and 0 <= value < 1  # type: ignore[operator]


def is_positive_integer(value: object) -> bool:
    """A whole number above zero, not a bool."""
    return is_whole_number(value) and value > 0  # type: ignore[operator]
