"""Import paths from before the layout of docs/architecture.md, kept working: `import epo_trl.testing` still finds
`build_tiny_model`. Each old module name is an alias whose attributes are looked up, on first use, in the modules
that now hold them (with a DeprecationWarning naming the new path). New code imports the new paths."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the modules that now hold its public names, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "epo_trl.config": ("epo_trl.trainers.epo.epo_config",),
    "epo_trl.trainer": ("epo_trl.trainers.epo.epo_trainer",),
    "epo_trl.entropy": ("epo_trl.trainers.epo.epo_math", "epo_trl.trainers.grpo.turn_math"),
    "epo_trl.aepo": ("epo_trl.trainers.aepo.aepo_trainer", "epo_trl.trainers.aepo.aepo_config"),
    "epo_trl.aepo_math": ("epo_trl.trainers.aepo.aepo_math",),
    "epo_trl.advantages": ("epo_trl.trainers.grpo.gigpo",),
    "epo_trl.checkpoints": ("epo_trl.trainers.checkpoints",),
    "epo_trl.testing": ("epo_trl.models.tiny", "epo_trl.models.smollm2"),
    "epo_trl.warmstart": ("epo_trl.models.warmstart",),
    "epo_trl.train": ("epo_trl.cli.train",),
    "epo_trl.evaluate": ("epo_trl.cli.evaluate", "epo_trl.rollout.backends.vllm"),
    "epo_trl.envs.base": ("epo_trl.envs.protocol",),
    "epo_trl.envs._alfworld_games": ("epo_trl.envs.alfworld.games",),
    "epo_trl.rollout.step_mode": ("epo_trl.rollout.step",),
    "epo_trl.rollout.kv_cache": ("epo_trl.rollout.backends.hf_kv_cache",),
    "epo_trl.rollout.workers": ("epo_trl.envs.pool",),
}


class _Alias(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for target in MOVED[self.__name__]:
            module = importlib.import_module(target)
            if hasattr(module, name):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {target}.{name}; the old path will be removed.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved: {MOVED[self.__name__]})")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return _Alias(spec.name)

    def exec_module(self, module):
        pass


def install_moved_modules() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
