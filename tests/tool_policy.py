"""A scripted tool-calling policy for TRL's tool loop, and small TRL environments for the tests.

Stand-in for generation only (a random tiny model emits no parseable tool calls): it replaces
`GRPOTrainer._generate_single_turn`, so everything else is TRL's real loop (chat template, tool-call parsing, tool
execution, `tool_mask`, rewards) and our real trainers. Each completion is a tool call in Qwen2.5's format or a
final answer; the choice is a seeded function of the prompt's ids and its place in the call, so a GRPO group's
copies of one prompt diverge, rollouts make different numbers of calls, and reruns (resume, other ranks) repeat.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

STOP = "done"


class ScriptedToolPolicy:
    """`call(text, rng) -> (tool name, arguments) | None` decides one assistant turn from the conversation so far."""

    def __init__(self, trainer, call, stop_probability: float = 0.35):
        self.tok = trainer.processing_class
        self.call, self.stop_probability = call, stop_probability
        self.calls: list[int] = []  # prompts per generate call
        trainer._generate_single_turn = self.generate

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self.calls.append(len(prompt_ids))
        out = []
        for j, ids in enumerate(prompt_ids):
            seed = int(hashlib.sha256(f"{list(ids)}|{j}".encode()).hexdigest()[:12], 16)
            rng = random.Random(seed)
            text = self.tok.decode(ids)
            decision = None if rng.random() < self.stop_probability else self.call(text, rng)
            if decision is None:
                reply = f"{STOP}<|im_end|>"
            else:
                name, arguments = decision
                reply = f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call><|im_end|>"
            out.append(self.tok(reply, add_special_tokens=False)["input_ids"])
        return out, None


def increment_call(text, rng):
    return "increment", {"step": rng.randint(1, 3)}


def admissible_call(text, rng):
    """An `act` call with one of the last listed admissible actions (the adapter's observations list them)."""
    lines = re.findall(r"Admissible actions: (.*)", text)
    actions = lines[-1].split(", ") if lines else ["look"]
    return "act", {"action": rng.choice(actions)}


class Counter:
    """Counts up; the reward is the final count."""

    def reset(self, **row) -> str:
        self.count = 0
        return None

    def increment(self, step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.count += int(step)
        return f"count {self.count}"

    def get_reward(self) -> float:
        return float(self.count)


class Doubler:
    """Another environment for the dict form: one tool, `double`; the reward is the final value."""

    def reset(self, **row) -> str:
        self.count = 1
        return " (start at 1)"

    def double(self) -> str:
        """Double the counter."""
        self.count *= 2
        return f"count {self.count}"

    def get_reward(self) -> float:
        return float(self.count)


def double_call(text, rng):
    return "double", {}


def any_call(text, rng):
    """`double` when the prompt offers it (the dict form renders each row's own tools), else `increment`."""
    return double_call(text, rng) if '"double"' in text else increment_call(text, rng)


def turn_segments(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every run of 1s: the assistant turns of one completion, by hand."""
    runs, start = [], None
    for j, m in enumerate([*mask, 0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    return runs
