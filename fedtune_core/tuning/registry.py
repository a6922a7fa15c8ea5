"""The registry of tuning methods: register, look up, apply, count.

Imports nothing of the method modules; they import :func:`register` from here. Imports no
torch either (nor do the method modules at import time), so the CLI can list methods and
check their options without loading the heavy libraries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune_core.errors import ConfigError, check_choice

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Method:
    """A registered tuning method."""

    name: str
    config: type  # frozen dataclass of the method's options
    apply: Callable[[nn.Module, Any], list[str]]  # adds modules, returns names to train
    lr: Mapping[str, float]  # default learning rate per optimizer (sgd, adamw)


METHODS: dict[str, Method] = {}


def register(name: str, config: type, lr: Mapping[str, float]):
    """Decorator registering ``apply`` as tuning method ``name``; duplicates are refused."""

    def deco(apply):
        if name in METHODS:
            raise ValueError(f"tuning method {name!r} is already registered")
        METHODS[name] = Method(name, config, apply, dict(lr))
        return apply

    return deco


def method_config(name: str, options: Mapping[str, Any] | None = None):
    """The method's config dataclass built from ``options`` (unknown keys refused)."""
    check_choice("tuning method", name, METHODS)
    cls = METHODS[name].config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for tuning method {name!r}; "
                          f"valid options: {valid}")
    try:
        return cls(**dict(options or {}))
    except TypeError as err:  # a value of the wrong type reaching a comparison
        raise ConfigError(f"bad option for tuning method {name!r}: {err}") from None


def default_lr(name: str, optimizer: str) -> float:
    """The method's default learning rate for ``optimizer``."""
    check_choice("tuning method", name, METHODS)
    return METHODS[name].lr[optimizer]


def mark_trainable(model: nn.Module, names: set[str]) -> list[str]:
    """Freeze every parameter, then unfreeze exactly ``names``; return them in model order."""
    params = dict(model.named_parameters())
    missing = sorted(names - set(params))
    if missing:
        raise ValueError(f"tuning method named parameters the model lacks: {missing[:5]}")
    for name, param in params.items():
        param.requires_grad_(name in names)
    return [n for n in params if n in names]


def prepare(model: nn.Module, name: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Apply tuning method ``name`` to ``model``; return the names of the trainable parameters.

    The head always trains; everything the method does not name is frozen.
    """
    cfg = method_config(name, options)
    wanted = set(METHODS[name].apply(model, cfg))
    wanted |= {n for n, _ in model.named_parameters() if n.startswith("head.")}
    return mark_trainable(model, wanted)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
