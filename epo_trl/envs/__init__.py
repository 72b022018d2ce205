"""Text environments behind one protocol (`base.TextEnv`), and a registry to build them by name."""

from __future__ import annotations

import importlib
from typing import Any

from .protocol import SPLITS, EnvFactory, TaskSpec, TextEnv

# name -> "module:FactoryClass"; modules are imported lazily so optional extras stay optional.
ENV_REGISTRY: dict[str, str] = {
    "maze": "epo_trl.envs.maze:MazeFactory",
    "scienceworld": "epo_trl.envs.scienceworld:ScienceWorldFactory",
    "alfworld": "epo_trl.envs.alfworld:ALFWorldFactory",
    "textworld_express": "epo_trl.envs.textworld_express:TextWorldExpressFactory",
}


def make_factory(name: str, **kwargs: Any) -> EnvFactory:
    """Build the factory of the environment registered as `name` with its keyword options."""
    if name not in ENV_REGISTRY:
        raise ValueError(f"Unknown environment {name!r}. Known: {sorted(ENV_REGISTRY)}.")
    module_name, cls_name = ENV_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**kwargs)


def task_dataset(factory: EnvFactory, split: str = "train", limit: int | None = None):
    """A `datasets.Dataset` whose `prompt` column holds one task key per task instance of `split`.

    Pass it as `train_dataset`: TRL's sampler repeats each prompt `num_generations` times, so a GRPO
    group plays one task instance.
    """
    from datasets import Dataset

    tasks = factory.tasks(split)
    if limit is not None:
        tasks = tasks[:limit]
    if not tasks:
        raise ValueError(f"Environment {factory.name!r} has no tasks in split {split!r}.")
    return Dataset.from_dict({"prompt": [t.key() for t in tasks]})


__all__ = ["ENV_REGISTRY", "SPLITS", "EnvFactory", "TaskSpec", "TextEnv", "make_factory", "task_dataset"]
