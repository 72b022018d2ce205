"""Reward functions for trajectory mode: they read the per-episode fields the rollout returns.

TRL passes every extra key of the rollout's output to reward functions as keyword arguments. Failed episodes
(env crash / timeout) return None: TRL treats a row whose rewards are all None as unscorable (advantage 0,
excluded from the group baseline), which is this project's policy for failed episodes.
"""

from __future__ import annotations


def episode_return_reward(completions, episode_return=None, failed=None, **kwargs) -> list[float | None]:
    """The episode's return: win_reward * won + invalid_penalty * invalid turns (see `RolloutConfig`)."""
    if episode_return is None:
        raise ValueError(
            "episode_return_reward needs the `episode_return` column; use it with TrajectoryRollout as rollout_func."
        )
    failed = failed or [False] * len(episode_return)
    return [None if f else float(r) for r, f in zip(episode_return, failed)]


def env_return_reward(completions, env_return=None, failed=None, **kwargs) -> list[float | None]:
    """The sum of the rewards the env's own `step` returned over the episode (the env's scale, e.g. ScienceWorld's
    10 on a win; a shaped env's partial rewards): for envs whose own reward is the objective."""
    if env_return is None:
        raise ValueError(
            "env_return_reward needs the `env_return` column; use it with TrajectoryRollout as rollout_func."
        )
    failed = failed or [False] * len(env_return)
    return [None if f else float(r) for r, f in zip(env_return, failed)]


def won_reward(completions, won=None, failed=None, **kwargs) -> list[float | None]:
    """1.0 for a won episode, 0.0 otherwise (a success-rate reward)."""
    if won is None:
        raise ValueError("won_reward needs the `won` column; use it with TrajectoryRollout as rollout_func.")
    failed = failed or [False] * len(won)
    return [None if f else float(w) for w, f in zip(won, failed)]
