"""One played episode (its turns, tokens and outcome) and the result of a batch of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..envs.pool import EnvHandle
from ..envs.protocol import TaskSpec
from .config import RolloutConfig


@dataclass
class Turn:
    """One model turn. `prompt_ids` is the step-mode prompt (empty in trajectory mode)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    action: str | None  # the command sent to the env; None = invalid turn
    error: str | None  # why the action was invalid
    hit_token_limit: bool
    observation: str = ""  # what the env answered (or the invalid-action note)
    context_tokens: int = 0  # tokens the model read to write this turn (step prompt or trajectory so far)
    env_reward: float = 0.0  # the reward the env's step returned (0.0 when no step was taken)


@dataclass
class Episode:
    task: TaskSpec
    goal: str = ""
    observation: str = ""
    admissible: list[str] | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    terminated: bool = False  # the env ended the episode by the task's own rules (won or lost)
    won: bool = False
    failed: bool = False
    failure: str | None = None
    # cut off without an outcome: "env_limit" (the env's own step limit: `step` returned truncated=True), or a
    # budget of the rollout: "turn_limit" (max_turns), "context" (prompt / trajectory tokens)
    truncated: str | None = None
    env: EnvHandle | None = None  # its live env, in the pool's threads or worker processes
    # trajectory mode: the single row being built
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.terminated or self.failed or self.truncated is not None

    @property
    def invalid_turns(self) -> int:
        return sum(t.action is None for t in self.turns)

    @property
    def env_return(self) -> float:
        """The sum of the rewards the env's steps returned (the env's own scale; not the training return)."""
        return sum(t.env_reward for t in self.turns)

    def episode_return(self, config: RolloutConfig) -> float:
        if self.failed:
            return 0.0
        return config.win_reward * float(self.won) + config.invalid_penalty * self.invalid_turns

    def record(self, config: RolloutConfig) -> dict[str, Any]:
        """Plain-Python summary (evaluation, benchmarks)."""
        return {
            "task": self.task.key(),
            "won": self.won,
            "return": self.episode_return(config),
            "length": len(self.turns),
            "invalid": self.invalid_turns,
            "failed": self.failed,
            "failure": self.failure,
            "terminated": self.terminated,
            "truncated": self.truncated,
            "env_return": self.env_return,
            "turns": [
                {"text": t.text, "action": t.action, "observation": t.observation, "context_tokens": t.context_tokens}
                for t in self.turns
            ],
        }


@dataclass
class RolloutResult:
    episodes: list[Episode]
    gen_time_s: float = 0.0
    env_time_s: float = 0.0
    backend_calls: int = 0

    def records(self, config: RolloutConfig) -> list[dict[str, Any]]:
        return [e.record(config) for e in self.episodes]
