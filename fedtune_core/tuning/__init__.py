"""Tuning methods: a registry of small modules, one per method.

A method is a frozen config dataclass plus ``apply(model, cfg) -> list[str]``: it adds
its modules to a :class:`~fedtune_core.fl.models.Classifier` and returns the names of the
parameters it wants trained. :func:`prepare` then freezes everything and unfreezes those
names plus the head, which always trains. Adding a method is one file in this package
(registered with :func:`register`) plus one row in the contract-test table.
"""

from fedtune_core.tuning import adapter, bias, full, head, lora, prompt  # noqa: F401  (register)
from fedtune_core.tuning.registry import (
    METHODS,
    Method,
    count_parameters,
    default_lr,
    mark_trainable,
    method_config,
    prepare,
    register,
)

__all__ = ["METHODS", "Method", "count_parameters", "default_lr", "mark_trainable",
           "method_config", "prepare", "register"]
