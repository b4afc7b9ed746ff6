"""Tests of plain values, shared by the checks across llm. Python's bool is an int, but True is
never a count of tokens nor a temperature: neither test takes it."""

from __future__ import annotations


def is_whole_number(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float (NaN and infinities too: compare to refuse them), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_integer(value: object) -> bool:
    """A whole number above zero, not a bool."""
    return is_whole_number(value) and value > 0  # type: ignore[operator]
