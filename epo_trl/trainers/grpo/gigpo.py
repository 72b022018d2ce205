"""Per-turn advantages for step mode: GiGPO's anchor-state step advantages (arXiv 2505.10978), opt-in.

GRPO (the default, and the baseline) gives every turn of episode i the same episode advantage

    A^E(i) = (R_i - mean_group(R)) / std_group(R)                                   (GiGPO eq. 3)

GiGPO adds a step-level term. Turns of the same group (same task) that start from the same environment state s
(an "anchor state": identical observation) form a step group; each such turn carries its discounted return

    G(i, t) = sum_{k >= t} gamma^(k - t) r(i, k)                                      (GiGPO eq. 5)

and its step advantage is its return relative to the other turns taken from that state:

    A^S(i, t) = (G(i, t) - mean_{step group}(G)) / std_{step group}(G)               (GiGPO eq. 6)

(0 for a state visited once). The row's advantage is A^E(i) + omega * A^S(i, t)           (GiGPO eq. 7).
So the first move out of a shared start room is credited by how well episodes that made it went from there, not
only by the episode's final outcome. Paper defaults: gamma = 0.95, omega = 1, std normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1} for one episode's per-turn rewards (eq. 5)."""
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def step_advantages(
    groups: Sequence[int],
    states: Sequence[Sequence[Hashable]],
    rewards: Sequence[Sequence[float]],
    gamma: float = 0.95,
    scale: bool = True,
    eps: float = 1e-4,
) -> list[list[float]]:
    """GiGPO's A^S(i, t) for every turn of every episode (eq. 6).

    Args:
        groups: group id of each episode (episodes of one task instance share it).
        states: per episode, the anchor-state key of each turn (the observation the turn acted on).
        rewards: per episode, the reward of each turn (e.g. invalid penalty; the win reward on the winning turn).
        scale: divide by the step group's std (GiGPO's default) or only subtract its mean.
    Failed episodes: pass an empty turn list; they join no step group.
    """
    returns = [discounted_returns(r, gamma) for r in rewards]
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for i, (g, keys) in enumerate(zip(groups, states)):
        for t, key in enumerate(keys):
            buckets.setdefault((g, key), []).append((i, t))
    out = [[0.0] * len(r) for r in returns]
    for members in buckets.values():
        if len(members) < 2:
            continue  # a state visited once has no comparison: A^S = 0
        values = torch.tensor([returns[i][t] for i, t in members], dtype=torch.float64)
        centered = values - values.mean()
        if scale:
            centered = centered / (values.std() + eps)  # sample std, like TRL's group std
        for (i, t), a in zip(members, centered.tolist()):
            out[i][t] = a
    return out


def combine(
    episode_adv: Sequence[float], step_adv: Sequence[Sequence[float]], omega: float = 1.0
) -> list[list[float]]:
    """A(i, t) = A^E(i) + omega * A^S(i, t) (eq. 7); a NaN episode advantage (failed episode) gives 0 everywhere."""
    return [[0.0 if math.isnan(a) else a + omega * s for s in steps] for a, steps in zip(episode_adv, step_adv)]
