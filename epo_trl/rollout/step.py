"""Step mode (the EPO paper's setup): episodes whose every turn becomes one training row.

This rollout plays the episodes (`play`) and knows their rewards; turning them into rows (advantages, padding,
old log-probs) is the trainer's job: `epo_trl.trainers.grpo.step_batch`, which every trainer here calls for a
rollout with `mode == "step"`. It does not fit `rollout_func`'s one-row-per-prompt contract, so a plain
`trl.GRPOTrainer` cannot use it (use TrajectoryRollout there).
"""

from __future__ import annotations

from typing import Any

from .engine import EnvRollout
from .episode import Episode


class StepRollout(EnvRollout):
    """Step-wise rollout; pass it as `rollout_func=` to an epo_trl trainer (EPOTrainer, MultiTurnGRPOTrainer)."""

    mode = "step"

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        raise RuntimeError(
            "StepRollout makes one training row per episode turn, which TRL's rollout_func contract (one row per "
            "prompt) cannot carry. Use it with an epo_trl trainer (EPOTrainer, "
            "MultiTurnGRPOTrainer), which builds the rows itself, or use TrajectoryRollout for a plain GRPOTrainer."
        )

    def turn_rewards(self, episode: Episode) -> list[float]:
        """Per-turn rewards whose sum is the episode return: invalid penalty per invalid turn, win on the last."""
        rewards = [self.config.invalid_penalty * (t.action is None) for t in episode.turns]
        if episode.won and rewards:
            rewards[-1] += self.config.win_reward
        return rewards
