"""Test helpers for the rollout tests: a scripted env and a counting backend (the vLLM stand-in: vllm_standin.py)."""

from __future__ import annotations

import threading
import time

from epo_trl.envs.protocol import EnvFactory, TaskSpec, TextEnv
from epo_trl.rollout import CallableBackend, Generation


class CountingBackend:
    """Wraps a backend and records the prompt count of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.lockstep = inner.lockstep

    def generate(self, prompts, max_new_tokens, temperature=None) -> Generation:
        self.calls.append(len(prompts))
        return self.inner.generate(prompts, max_new_tokens, temperature)


class CountdownEnv(TextEnv):
    """Ends (won) after `task.variation` valid actions. Task "raise" raises at the first step, "hang" sleeps."""

    hang_seconds = 3.0

    def __init__(self, log: list):
        self.log = log
        self.closed = False

    def reset(self, task: TaskSpec):
        self.task, self.left = task, task.variation
        self.log.append(("reset", task.key(), threading.get_ident()))
        return f"count {self.left}", {"goal": "reach zero"}

    def admissible_actions(self):
        return ["go"]

    def step(self, action: str):
        if self.task.task == "raise":
            raise RuntimeError("scripted env failure")
        if self.task.task == "hang":
            time.sleep(self.hang_seconds)
        self.left -= 1
        done = self.left <= 0
        return ("won" if done else f"count {self.left}"), float(done), done, False, {"won": done}

    def close(self):
        self.closed = True


class CountdownFactory(EnvFactory):
    name = "countdown"
    prompt_header = "you count down to zero ."

    def __init__(self):
        self.log: list = []
        self.made: list[CountdownEnv] = []

    def make(self) -> CountdownEnv:
        env = CountdownEnv(self.log)
        self.made.append(env)
        return env

    def tasks(self, split: str = "train") -> list[TaskSpec]:
        return [TaskSpec("countdown", "count", n, seed) for seed, n in enumerate([1, 2, 3, 4, 1, 2, 3, 4])]


WORDS = ["count", "zero", "won", "down", "go", "reach", "ok"]


def scripted_backend(tokenizer, text: str = "<think> ok </think> <action> go </action>", lockstep: bool = False):
    """A backend that answers every prompt with `text` + EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return CallableBackend(lambda prompts, n, t: [ids for _ in prompts], lockstep=lockstep)
