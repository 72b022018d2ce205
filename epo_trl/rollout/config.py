"""RolloutConfig: how episodes are played and rendered (turn budget, prompt, parsing, env workers, rewards)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..envs.pool import WORKER_KINDS
from ..envs.pool.remote import probe_servers

MODES = ("step", "trajectory")


@dataclass
class RolloutConfig:
    """Budgets and scoring of a rollout. Every budget is enforced and counted in the metrics (field help below)."""

    max_turns: int = field(
        default=10,
        metadata={"help": "Turn limit per episode (>= 1); an episode that reaches it is truncated, not won."},
    )
    max_turn_tokens: int = field(
        default=64,
        metadata={"help": "Max new tokens per turn (>= 1); a turn that hits it has no EOS and counts as truncated."},
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Step mode: token budget of one turn's prompt; the history is shortened first, then the episode is truncated. None = no limit."
        },
    )
    max_trajectory_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Trajectory mode: token budget of prompt + all turns; the episode is truncated before a turn could exceed it. None = no limit."
        },
    )
    prompt_history_pairs: int = field(
        default=2,
        metadata={
            "help": "Step mode: (observation, action) pairs of the episode's history shown in each turn's prompt (paper: 2)."
        },
    )
    win_reward: float = field(
        default=10.0,
        metadata={"help": "Episode return = win_reward * won + invalid_penalty * invalid turns (paper: 10)."},
    )
    invalid_penalty: float = field(
        default=-0.1,
        metadata={
            "help": "Return added per invalid turn (missing tags, non-ASCII, action the env rejects; paper: -0.1)."
        },
    )
    step_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "An env call (reset/step) running longer than this (> 0 seconds) fails the episode; the env is replaced."
        },
    )
    num_workers: int = field(default=8, metadata={"help": "Workers (>= 1) stepping environments in parallel."})
    env_workers: str = field(
        default="auto",
        metadata={
            "help": "Who runs the envs: 'threads' (in this process; cheap pure-Python envs), 'processes' (worker processes owning their envs; envs that are not thread-safe or hold a JVM) or 'auto' = the factory's `thread_safe` (docs/rollouts.md)."
        },
    )
    env_server_urls: list[str] | None = field(
        default=None,
        metadata={
            "help": "OpenEnv servers to play the episodes on (`epo-trl serve-env`, or any OpenEnv env with a text action), e.g. '[http://node1:8001, http://node2:8001]'; sessions are balanced across them. Each must answer at start. None = envs in this process tree (env_workers)."
        },
    )
    action_tags: tuple[str, str] = field(
        default=("<action>", "</action>"),
        metadata={"help": "Opening and closing tags around the action in the model's output."},
    )
    think_tags: tuple[str, str] = field(
        default=("<think>", "</think>"), metadata={"help": "Opening and closing tags around the model's reasoning."}
    )
    require_think: bool = field(default=False, metadata={"help": "True = a turn without the think tags is invalid."})
    require_tags: bool = field(
        default=True,
        metadata={
            "help": "False = lenient parsing: text without action tags goes to `env.project_action` (demos with tiny random models only; real runs keep the paper's strict format)."
        },
    )

    def __post_init__(self):
        if self.max_turns < 1 or self.max_turn_tokens < 1:
            raise ValueError(
                f"max_turns ({self.max_turns}) and max_turn_tokens ({self.max_turn_tokens}) must be >= 1."
            )
        if self.step_timeout_s <= 0 or self.num_workers < 1:
            raise ValueError("step_timeout_s must be > 0 and num_workers >= 1.")
        if self.env_workers not in WORKER_KINDS:
            raise ValueError(f"env_workers={self.env_workers!r}: use one of {WORKER_KINDS}.")
        if self.env_server_urls is not None:
            if isinstance(self.env_server_urls, str):
                self.env_server_urls = [self.env_server_urls]
            self.env_server_urls = list(self.env_server_urls)
            if not self.env_server_urls:
                raise ValueError("env_server_urls=[]: pass at least one server URL, or None for local envs.")
            # here, not at the first rollout: a wrong or down server stops the run before any model is loaded
            probe_servers(self.env_server_urls)
