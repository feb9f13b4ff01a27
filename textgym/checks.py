"""Predicates behind the argument checks of the library (each caller words its own error)."""

from __future__ import annotations

from typing import Any


def is_real(value: Any) -> bool:
    """An ``int`` or ``float``, but not a ``bool`` (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    """An ``int`` of at least 1, but not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
