"""Argument checks shared by the package's classes (losses, encoder settings, models): each returns the
checked value or raises ``TypeError`` / ``ValueError`` with a message naming the argument, the value and
what is allowed. A caller that reads a user's setting turns these into a ``ConfigError``.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple



def real(name: str, value) -> float:
    # bool is a numbers.Real subclass; `tau: true` in a YAML file is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def positive(name: str, value) -> float:
    checked = real(name, value)
    if checked <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return checked


def non_negative(name: str, value) -> float:
    checked = real(name, value)
    if checked < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return checked


def choice(name: str, value, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
