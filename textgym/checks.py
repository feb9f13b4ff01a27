"""Predicates behind the argument checks of the library (each caller words its own error).

Numbers of any numeric type count, NumPy scalars included (``np.int64(8)``, ``np.float32(0.1)``),
as Python's :mod:`numbers` tower defines them; booleans never do, although Python counts ``True``
as an int and NumPy's ``np.bool_`` converts to one. Callers store what they accept as plain
``int``/``float`` (:func:`as_int`, ``float(value)``), so that JSON, torch and ``repr`` downstream
see ordinary Python numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_bool(value: Any) -> bool:
    """A Python ``bool`` or a NumPy ``np.bool_``."""
    return isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """A real number of any numeric type (``int``, ``float``, NumPy scalars, ...), but not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_finite_real(value: Any) -> bool:
    """A real number (:func:`is_real`) that is neither infinite nor NaN, and fits in a float."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        return False


def is_integer(value: Any) -> bool:
    """An integer of any integral type (``int``, ``np.int64``, ...), but not a bool."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_positive_int(value: Any) -> bool:
    """An integer of any integral type (NumPy's included) of at least 1, but not a bool."""
    return is_integer(value) and bool(value >= 1)


def as_int(value: Any) -> Any:
    """``value`` as a plain ``int`` if it is an integer of another type (``np.int64``), else as given."""
    return int(value) if is_integer(value) else value


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def describe(value: Any) -> str:
    """``value`` for an error message: its (cut) ``repr`` and its type, e.g. ``"'8' (str)"``."""
    return f"{short_repr(value)} ({type(value).__name__})"
