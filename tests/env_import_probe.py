"""An env that reports which heavy modules its process has loaded (imports nothing but epo_trl.envs)."""

import sys

from epo_trl.envs.protocol import EnvFactory, TaskSpec, TextEnv

HEAVY = ("torch", "transformers", "trl", "accelerate", "vllm")


class ProbeEnv(TextEnv):
    def reset(self, task: TaskSpec):
        return " ".join(m for m in HEAVY if m in sys.modules) or "none", {"goal": "probe"}

    def admissible_actions(self):
        return ["stop"]

    def step(self, action: str):
        return "done", 0.0, True, False, {"won": False}


class ProbeFactory(EnvFactory):
    name = "probe"
    prompt_header = "probe"
    thread_safe = False

    def make(self) -> ProbeEnv:
        return ProbeEnv()

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        return [TaskSpec("probe", "probe", 0, 0)]
