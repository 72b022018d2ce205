"""The text-environment protocol every environment implements.

It is deliberately small and gymnasium-like, so third parties can implement it without touching the
rollout engine:

    env = factory.make()                      # one live environment (may hold a JVM, a game engine ...)
    obs, info = env.reset(task)               # start the episode of a TaskSpec
    obs, reward, terminated, truncated, info = env.step(text)  # one projected action (Gymnasium's shape)
    env.admissible_actions()                  # optional list of valid commands (None = not offered)
    env.close()                               # release resources, exactly once

`terminated`: the episode ended by the task's own rules (won, or lost, e.g. a wrong answer). `truncated`: it was cut
off without an outcome (the env's own step limit); the rollout's `max_turns` truncates too, on the rollout's side.
Either ends the episode. `info` carries `won` (bool; True only on a terminating step) and, on reset, `goal` (the
task description). The rollout checks the types (observation str, reward a finite number, terminated / truncated /
won real bools, goal str, admissible actions a list of str) and fails an episode whose env returns anything else.
The reward returned by `step` is the environment's own: the episode records it (`Turn.env_reward`, the record's
`env_return`, the trajectory rollout's `env_return` column for reward functions); the training return stays the
rollout's (default 10 x won, plus invalid-action penalties).
"""

from __future__ import annotations

import math
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

# What counts as one word of an env's text (for word-level tokenizers covering an env: `EnvFactory.vocabulary`).
_WORD_RE = r"</?think>|</?action>|[A-Za-z]+|\d|[^\sA-Za-z\d]"


def words_of(texts: Iterable[str]) -> list[str]:
    """Every token-like piece of `texts`, for building a tokenizer that covers an environment."""
    out: list[str] = []
    for text in texts:
        out.extend(re.findall(_WORD_RE, text))
    return out


SPLITS = ("train", "valid_seen", "valid_unseen")


@dataclass(frozen=True)
class TaskSpec:
    """One task instance: which env, which task, which variation, which seed.

    Every member of a GRPO group plays the same TaskSpec; the spec is carried through TRL as the
    dataset's prompt string (`key()` / `parse()`), so the RepeatSampler's copies of a prompt are copies
    of the same task instance.
    """

    env: str
    task: str
    variation: int = 0
    seed: int = 0

    def key(self) -> str:
        return f"{self.env}|{self.task}|{self.variation}|{self.seed}"

    @classmethod
    def parse(cls, key: str) -> TaskSpec:
        parts = key.split("|")
        if len(parts) != 4:
            raise ValueError(
                f"Not a task key: {key!r}. Expected 'env|task|variation|seed' as made by TaskSpec.key(); "
                "build the training dataset with epo_trl.envs.task_dataset()."
            )
        env, task, variation, seed = parts
        return cls(env=env, task=task, variation=int(variation), seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unseen_tasks(candidates: Iterable[TaskSpec], count: int, content_key, seen: set[str]) -> list[TaskSpec]:
    """The first `count` of `candidates` (fewer when they run out) whose `content_key` is not in `seen` (e.g. the
    train split's keys) nor taken before: held-out tasks unseen by content and distinct."""
    taken: set[str] = set()
    out: list[TaskSpec] = []
    for task in candidates:
        if len(out) == count:
            break
        key = content_key(task)
        if key not in seen and key not in taken:
            taken.add(key)
            out.append(task)
    return out


class TextEnv(ABC):
    """A single live text environment. Not thread-safe; the rollout gives each worker its own."""

    @abstractmethod
    def reset(self, task: TaskSpec) -> tuple[str, dict[str, Any]]:
        """Start `task`; return (first observation, info with at least 'goal')."""

    @abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply one action; return (observation, reward, terminated, truncated, info with 'won').

        terminated: the task's own rules ended the episode (won or lost); truncated: cut off without an outcome (the
        env's own step limit). info['won'] may be True only when terminated."""

    def admissible_actions(self) -> list[str] | None:
        """Valid commands in the current state, or None when the env does not offer them."""
        return None

    def project_action(self, action: str) -> str | None:
        """Map the model's action text to a command, or None when it is not a usable action.

        The rollout has already extracted the text between the action tags; environments refine it
        (lower-casing, matching against admissible commands). Default: stripped text, None if empty.
        """
        action = action.strip()
        return action or None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (processes, JVMs). Called exactly once."""


class EnvFactory(ABC):
    """Creates live environments and lists the task instances of each split."""

    name: str = "env"
    #: First lines of every turn's prompt: what the agent is and what the world is (paper-style header).
    prompt_header: str = "You are an expert agent operating in a text environment."
    #: True: separate envs may run concurrently in threads of one process (cheap pure-Python envs); the rollout's
    #: `env_workers="auto"` then uses threads. False: process-global state or a JVM; envs run in worker processes
    #: (the factory must then be picklable, i.e. defined in an importable module). See docs/rollouts.md.
    thread_safe: bool = True
    #: Modules worker processes import once up front (the forkserver preloads them, so each worker starts warm).
    worker_imports: tuple[str, ...] = ()

    @abstractmethod
    def make(self) -> TextEnv:
        """A fresh live environment (each rollout worker owns one)."""

    @abstractmethod
    def tasks(self, split: str = "train") -> list[TaskSpec]:
        """Task instances of `split` (one of SPLITS, or an env-specific name)."""

    def content_key(self, task: TaskSpec) -> str | None:
        """A canonical hash of the game `task` starts (layout or initial state, and goal), for checking that held-out
        splits are unseen by content, not only by seed. None: this factory cannot tell (the default)."""
        return None

    def task_types(self) -> list[str]:
        """Task type names, for per-type evaluation tables."""
        return sorted({t.task for t in self.tasks("train")})

    def task_type(self, task: TaskSpec) -> str:
        """The type a task instance belongs to (default: its task name)."""
        return task.task

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the factory itself holds (e.g. the simulator its expert `solve` plans in); rebuilt on use."""


# ----- what envs return, checked next to the env (a wrong type fails the episode with a message naming the env and
# the field) -------------------------------------------------------------------------------------------------------
class EnvProtocolError(TypeError):
    """An environment returned a value of the wrong type (named env, named field)."""


def _bad(env: str, field: str, value: Any, expected: str) -> EnvProtocolError:
    return EnvProtocolError(
        f"env {env!r} returned {field} = {value!r:.80} ({type(value).__name__}); expected {expected}"
    )


def _as_bool(env: str, field: str, value: Any) -> bool:
    # numpy bools are fine; strings ("false" is truthy) and numbers are not
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise _bad(env, field, value, "a bool")


def check_admissible(env: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise _bad(env, "admissible_actions()", value, "a list of str or None")
    return list(value)


def check_reset(env: str, out: Any) -> tuple[str, str]:
    """(observation, goal) of `env.reset(task)`."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise _bad(env, "reset()", out, "a tuple (observation, info)")
    obs, info = out
    if not isinstance(obs, str):
        raise _bad(env, "reset() observation", obs, "a str")
    if not isinstance(info, dict):
        raise _bad(env, "reset() info", info, "a dict")
    goal = info.get("goal", "")
    if not isinstance(goal, str):
        raise _bad(env, "reset() info['goal']", goal, "a str")
    return obs, goal


class StepResult(NamedTuple):
    """What the rollout keeps of one checked `env.step`."""

    obs: str
    reward: float
    terminated: bool
    truncated: bool
    won: bool


def check_step(env: str, out: Any) -> StepResult:
    """The checked result of `env.step(action)`: (observation, reward, terminated, truncated, info['won'])."""
    if isinstance(out, tuple) and len(out) == 4:
        raise EnvProtocolError(
            f"env {env!r} returned step() = (observation, reward, done, info), the old 4-tuple; return Gymnasium's "
            "(observation, reward, terminated, truncated, info): terminated = the task ended (won or lost), "
            "truncated = cut off by the env's own step limit (docs/rollouts.md, 'The environment protocol')"
        )
    if not isinstance(out, tuple) or len(out) != 5:
        raise _bad(env, "step()", out, "a tuple (observation, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = out
    if not isinstance(obs, str):
        raise _bad(env, "step() observation", obs, "a str")
    if isinstance(reward, (bool, str)) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise _bad(env, "step() reward", reward, "a finite number")
    terminated = _as_bool(env, "step() terminated", terminated)
    truncated = _as_bool(env, "step() truncated", truncated)
    if not isinstance(info, dict):
        raise _bad(env, "step() info", info, "a dict")
    won = _as_bool(env, "step() info['won']", info.get("won", False))
    if won and not terminated:
        raise _bad(env, "step() info['won']", won, "False on a step that does not terminate the episode")
    return StepResult(obs, float(reward), terminated, truncated, won)


def check_projection(env: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(env, "project_action()", value, "a str or None")
    return value or None
