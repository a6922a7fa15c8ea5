"""The one exception type for bad input, and the checks that raise it.

A ground-floor module: it imports nothing of fedtune's, so every other module can use it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad user input: one sentence naming the bad value and the valid choices.

    The CLI turns it into a single line on stderr and exit code 2, before anything is
    written.
    """


def choices(valid) -> str:
    """``valid`` as a comma-separated list, for error messages."""
    return ", ".join(str(v) for v in valid)


def check_choice(what: str, value: Any, valid) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {choices(valid)}")


def check_range(what: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ConfigError unless ``low <(=) value <= high``."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(f"{what} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")
