"""The exceptions for bad input and diverged runs, and the checks that raise them.

A ground-floor module: it imports nothing of fedtune's, so every other module can use it.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from typing import Any, TextIO

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit


class ConfigError(ValueError):
    """Bad user input: one sentence naming the bad value and the valid choices.

    The CLI turns it into a single line on stderr and exit code 2, before anything is
    written.
    """


class Fault(ConfigError):
    """A fault of the machine or the file system, not of the run: a full disk, a cache
    folder that is a file or read-only, a lock held too long, a path that cannot be written.

    Like bad input: one line on stderr, exit code 2, no record written (the run is not to
    blame, so no failed record stands for it).
    """


def shown(path: object) -> str:
    """A path for a one-line message: quoted, with control characters escaped (a newline
    or an escape code in a file name never breaks the line or the terminal)."""
    return repr(str(path))


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook executed by papermill) whose
    stderr is the cells' output, not the process's own."""
    return "ipykernel" in sys.modules and sys.__stderr__ is not None \
        and sys.stderr is not sys.__stderr__


def diagnostics() -> TextIO:
    """Where warnings go: stderr; inside a notebook the process's own stderr, i.e. the log
    (``run_all.sh`` writes it to ``logs/``), so a report's cells hold none of them."""
    return sys.__stderr__ if in_notebook() else sys.stderr


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


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number: an int or a float (not a bool), neither NaN
    nor infinite. The one number check of configs, profiles and records."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return isinstance(value, int) or math.isfinite(value)


def check_finite(round: int, metrics: Mapping[str, Any]) -> None:
    """Raise :class:`Diverged` at the first of ``metrics`` (name -> value) that is a real
    number but not finite (NaN, infinite); None and other values pass. The one non-finite
    check of a run's metrics: the loop's rows and the record's safety net."""
    for what, value in metrics.items():
        if (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
                and not math.isfinite(value)):
            raise Diverged(round, what, value)


def check_range(what: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number with ``low <(=) value <= high``."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"<= {high}"
    bounds = " and ".join(x for x in (lo, hi) if x)
    if not is_number(value):
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
