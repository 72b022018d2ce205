"""The methods `epo-trl train --algo NAME` can run: a registry, so the CLI, the demo and the studies dispatch by name.

A method folder declares its `Method`s in its `__init__.py` (`METHODS = (Method(...),)`); this file lists the
folders. Adding a method = a copied folder + one line in `BUILTIN`. A method that lives outside the package registers
itself with `register_method` before the CLI's `main` runs (tests/support/toy_method is a worked example).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The method folders, in the order `--help` lists them. One line per method folder.
BUILTIN = (
    "epo_trl.trainers.grpo",
    "epo_trl.trainers.epo",
    "epo_trl.trainers.aepo",
)


def _no_lines(args) -> list[str]:
    return []


def _no_band(args) -> tuple[float, float] | None:
    return None


@dataclass(frozen=True)
class Method:
    """What the CLI needs to run a method.

    Args:
        name: the `--algo` value.
        config_class: its TRL-style config dataclass (a `MultiTurnGRPOConfig` subclass).
        trainer_class: its trainer (a `MultiTurnGRPOTrainer` subclass).
        help: one line for `epo-trl train --help` and the docs.
        pins: config values the method fixes (`epo-base` is EPO with `smoothing` pinned off). A pinned key set by a
            flag, or in the same file as `algo`, is an error; one inherited from a recipe under `--algo` yields.
        describe: the method's resolved settings as lines, printed at the start of a run and in the demo's report.
        entropy_band: the (low, high) band the run plots draw around each turn's entropy, or None.
    """

    name: str
    config_class: type
    trainer_class: type
    help: str = ""
    pins: Mapping[str, Any] = field(default_factory=dict)
    describe: Callable[[Any], list[str]] = _no_lines
    entropy_band: Callable[[Any], tuple[float, float] | None] = _no_band

    def __post_init__(self):
        from .grpo import MultiTurnGRPOConfig, MultiTurnGRPOTrainer

        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"Invalid method name {self.name!r}: a non-empty word (the `--algo` value).")
        if not (isinstance(self.config_class, type) and issubclass(self.config_class, MultiTurnGRPOConfig)):
            raise ValueError(f"Method {self.name!r}: config_class must subclass MultiTurnGRPOConfig.")
        if not (isinstance(self.trainer_class, type) and issubclass(self.trainer_class, MultiTurnGRPOTrainer)):
            raise ValueError(f"Method {self.name!r}: trainer_class must subclass MultiTurnGRPOTrainer.")
        names = set(self.config_class.__dataclass_fields__)
        unknown = sorted(set(self.pins) - names)
        if unknown:
            raise ValueError(f"Method {self.name!r} pins {unknown}, which {self.config_class.__name__} lacks.")


_METHODS: dict[str, Method] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        for method in importlib.import_module(module).METHODS:
            register_method(method)


def register_method(method: Method, replace: bool = False) -> Method:
    """Make `method` runnable as `--algo method.name`. A name taken by another method is an error unless `replace`."""
    _load_builtin()
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method, got {type(method).__name__}.")
    taken = _METHODS.get(method.name)
    if taken is not None and taken != method and not replace:
        raise ValueError(f"A method named {method.name!r} is already registered; pass replace=True to override it.")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name: the built-in ones first, in `BUILTIN` order."""
    _load_builtin()
    return dict(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name` (KeyError naming the registered ones otherwise)."""
    found = methods().get(name)
    if found is None:
        raise KeyError(f"no method {name!r}; registered: {', '.join(methods())}")
    return found
