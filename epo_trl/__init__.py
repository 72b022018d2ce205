"""epo-trl: EPO and AEPO entropy control for multi-turn LLM agents, as drop-in TRL trainers."""

import importlib

__version__ = "0.1.0"

# The trainers import torch + TRL (seconds); environment worker processes and the CLI's argument checks import
# `epo_trl` subpackages without them, so the trainers load on first use (PEP 562).
_LAZY = {
    "AEPOConfig": ".trainers.aepo",
    "AEPOTrainer": ".trainers.aepo",
    "EPOConfig": ".trainers.epo",
    "EPOTrainer": ".trainers.epo",
    "MultiTurnGRPOConfig": ".trainers.grpo",
    "MultiTurnGRPOTrainer": ".trainers.grpo",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
