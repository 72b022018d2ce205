"""Test helpers for the rollout tests: a fake `VLLMGeneration`, a scripted env and a counting backend."""

from __future__ import annotations

import threading
import time

from epo_trl.envs.protocol import EnvFactory, TaskSpec, TextEnv
from epo_trl.rollout import CallableBackend, Generation


class FakeVLLMGeneration:
    """Honours `trl.generation.vllm_generation.VLLMGeneration.generate`'s signature and return shapes.

    `policy(prompt_ids) -> completion_ids` plays the model. In server mode the call is a real collective like
    TRL's (gather the prompts of all ranks, generate, slice this rank's part back), so unequal calls across ranks
    hang or mis-slice exactly as with a real server; `calls` records the prompt count of every call.
    """

    def __init__(self, policy, mode: str = "server", max_completion_length: int = 16, temperature: float = 1.0):
        self.policy, self.mode = policy, mode
        self.max_completion_length, self.temperature = max_completion_length, temperature
        self.calls: list[int] = []

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None) -> tuple:
        import torch.distributed as dist

        assert images is None and num_generations == 1, "the rollout must call with images=None, num_generations=1"
        self.calls.append(len(prompts))
        if self.mode == "server" and dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, prompts)
            if len({len(p) for p in gathered}) != 1:
                raise RuntimeError(f"ranks sent different prompt counts {[len(p) for p in gathered]}")
            all_prompts = [p for chunk in gathered for p in chunk]
            rank = dist.get_rank()
        else:
            all_prompts, rank = prompts, 0
        completions = [list(self.policy(p))[: self.max_completion_length] for p in all_prompts]
        logprobs = [[[-0.5] for _ in c] for c in completions]  # (batch, completion_len, num_logprobs=1)
        token_ids = [[[t] for t in c] for c in completions]
        mine = slice(rank * len(prompts), (rank + 1) * len(prompts))
        return all_prompts[mine], completions[mine], logprobs[mine], token_ids[mine]


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
        return ("won" if done else f"count {self.left}"), float(done), done, {"won": done}

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
