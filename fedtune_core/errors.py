"""The exceptions for bad input and diverged runs, and the checks that raise them.

A ground-floor module: it imports nothing of fedtune's, so every other module can use it.
"""

from __future__ import annotations

import math
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit


class ConfigError(ValueError):
    """Bad user input: one sentence naming the bad value and the valid choices.

    The CLI turns it into a single line on stderr and exit code 2, before anything is
    written.
    """


class Diverged(RuntimeError):
    """A run whose loss or metrics became non-finite (NaN or infinite).

    Deterministic: the same config diverges again, so its failed record is kept (not
    retried) unless asked to (``--retry-failed`` or ``--force``).

    Attributes:
        round: the round at which a non-finite value first appeared (0: before training).
        what: which value, e.g. ``"train_loss"``.
    """

    def __init__(self, round: int, what: str, value: Any = None):
        self.round, self.what = round, what
        super().__init__(f"diverged at round {round}: {what} is {value!r}")


def choices(valid) -> str:
    """``valid`` as a comma-separated list, for error messages."""
    return ", ".join(str(v) for v in valid)


def check_choice(what: str, value: Any, valid) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid``."""
    try:
        known = value in valid
    except TypeError:  # an unhashable value (a list, a dict) is in no dict of choices
        known = False
    if not known:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {choices(valid)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_range(what: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number with ``low <(=) value <= high``."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"<= {high}"
    bounds = " and ".join(x for x in (lo, hi) if x)
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{what} must be a finite number{' ' + bounds if bounds else ''}, "
                          f"got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ConfigError(f"{what} must be {bounds}, got {value!r}")


def check_int(what: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is an integer (not a bool) in ``low..high``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    check_range(what, value, low, high)


def check_str(what: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is a string."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r}")
