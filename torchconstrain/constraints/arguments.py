r"""Checks of the arguments constraint constructors take.

Each check returns the value it accepted (a number as ``float``, an integer as ``int``) or
raises a ``TypeError`` (wrong type) or ``ValueError`` (right type, value out of range)
naming the constraint, the argument, what it expects and what it got. Numbers are
Python or NumPy reals (``bool`` is not a number here); NaN never passes.

Example:
    >>> from torchconstrain.constraints.arguments import number
    >>> number("MaxNorm", "max_value", 2, low=0, low_open=True)
    2.0
    >>> number("MaxNorm", "max_value", "2", low=0, low_open=True)
    Traceback (most recent call last):
    ...
    TypeError: MaxNorm: expected max_value to be a number. Got str: '2'.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["number", "integer", "flag", "choice"]


def _got(value) -> str:
    return f"Got {type(value).__name__}: {value!r}."


def number(
    where: str,
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    r"""Return ``value`` as a float if it is a real number in the range, else raise.

    ``low``/``high`` bound it (``None``: unbounded), closed unless ``low_open``/``high_open``;
    ``finite=False`` lets ``inf`` (or ``-inf``) through when the range admits it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected {name} to be a number. {_got(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{where}: expected {name} to be {_range(low, high, low_open, high_open, finite)}. "
                         f"Got {beyond_float64(value)}.") from None
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if math.isnan(value) or below or above or (finite and math.isinf(value)):
        raise ValueError(f"{where}: expected {name} to be {_range(low, high, low_open, high_open, finite)}. Got {value!r}.")
    return value


def beyond_float64(value: int) -> str:
    r"""An integer too large for float64, in words: ``an integer of 401 digits, beyond float64``."""
    return f"an integer of {len(str(abs(int(value))))} digits, beyond float64"


def _range(low, high, low_open: bool, high_open: bool, finite: bool) -> str:
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def integer(where: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    r"""Return ``value`` as an int if it is an integer (not a bool) in ``[low, high]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: expected {name} to be an integer. {_got(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}"
        )
        raise ValueError(f"{where}: expected {name} to be an integer {bounds}. Got {value}.")
    return value


def flag(where: str, name: str, value) -> bool:
    r"""Return ``value`` if it is a bool, else raise a ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected {name} to be True or False. {_got(value)}")
    return value


def choice(where: str, name: str, value, options) -> str:
    r"""Return ``value`` if it is one of the strings ``options``, else raise."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected {name} to be one of {', '.join(map(repr, options))}. {_got(value)}")
    if value not in options:
        raise ValueError(f"{where}: unknown {name} {value!r}. Expected one of {', '.join(map(repr, options))}.")
    return value
