"""Reference policies that learn nothing, played on the same tasks with the same turn limit as a model: the numbers
every learning result stands next to (`epo-trl eval --policy random|walker|expert`, the demo's and the study's
reports).

- `random`: a uniformly random admissible action each turn.
- `walker`: an explorer that does not read the text. It takes or opens whatever it is offered (`take ...`,
  `open ...`), else moves through a random exit other than the one it came in by (back only from a dead end).
- `expert`: the factory's planner (`factory.solve(task, prefix)`), re-planned every turn.

`ceiling`: the share of tasks the expert wins within the turn limit, the best any policy can score.

The policies act on the env directly (its admissible actions), so they never write an invalid action: their
return is `win_reward * won`, the rollout's return without penalties.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..envs.protocol import EnvFactory, TaskSpec

POLICIES = ("random", "walker", "expert")
# What the walker reads from a command: moves (and which move undoes which), things to pick up or open.
_MOVE_WORDS = ("go", "move")
_REVERSE = {"north": "south", "south": "north", "east": "west", "west": "east", "up": "down", "down": "up"}
_GRAB_WORDS = ("take", "open")


def _words(command: str) -> list[str]:
    return command.lower().split()


def walker_choice(actions: Sequence[str], came_from: str | None, rng: random.Random) -> str:
    """The walker's command among `actions`: something to take or open, else an exit other than `came_from`."""
    grabs = [a for a in actions if _words(a)[:1] and _words(a)[0] in _GRAB_WORDS]
    if grabs:
        return rng.choice(grabs)
    moves = [a for a in actions if len(_words(a)) >= 2 and _words(a)[0] in _MOVE_WORDS]
    forward = [a for a in moves if _words(a)[-1] != came_from]
    return rng.choice(forward or moves or list(actions))


def play(factory: EnvFactory, tasks: Sequence[TaskSpec], policy: str, max_turns: int, k: int = 1, seed: int = 0,
         win_reward: float = 10.0) -> list[dict[str, Any]]:  # fmt: skip
    """Play every task k times with `policy` (one of POLICIES); records in `evaluation.summarize`'s format."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown baseline policy {policy!r}; use one of {POLICIES}.")
    if policy == "expert" and not hasattr(factory, "solve"):
        raise ValueError(f"env {factory.name!r} has no expert (its factory has no solve(task, prefix)).")
    records = []
    env = factory.make()
    try:
        for task in tasks:
            for sample in range(k):
                records.append(_episode(factory, env, task, policy, max_turns, random.Random(f"{policy}|{seed}|"
                               f"{task.key()}|{sample}"), win_reward))  # fmt: skip
    finally:
        env.close()
    return records


def _episode(factory, env, task: TaskSpec, policy: str, max_turns: int, rng: random.Random, win_reward: float):
    record = {"task": task.key(), "won": False, "return": 0.0, "length": 0, "invalid": 0, "failed": False}
    env.reset(task)
    played: list[str] = []
    came_from = None
    done = False
    while not done and len(played) < max_turns:
        if policy == "expert":
            plan = factory.solve(task, played)
            if not plan:
                break
            action = plan[0]
        else:
            actions = env.admissible_actions()
            if not actions:
                raise ValueError(f"env {factory.name!r} offers no admissible actions; the {policy} policy needs them.")
            action = rng.choice(actions) if policy == "random" else walker_choice(actions, came_from, rng)
        words = _words(action)
        if len(words) >= 2 and words[0] in _MOVE_WORDS:
            came_from = _REVERSE.get(words[-1])
        played.append(action)
        _, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if terminated:
            record["won"] = bool(info.get("won", False))
    record["length"] = len(played)
    record["return"] = win_reward * record["won"]
    return record


def ceiling(factory: EnvFactory, tasks: Sequence[TaskSpec], max_turns: int) -> float:
    """Share of `tasks` the expert wins within `max_turns` (its plan is no longer than that)."""
    return sum(len(factory.solve(t)) <= max_turns for t in tasks) / len(tasks)


def baselines(factory: EnvFactory, tasks: Sequence[TaskSpec], max_turns: int, k: int = 1, seed: int = 0,
              policies: Sequence[str] = POLICIES) -> dict[str, float]:  # fmt: skip
    """Success rate of each reference policy on `tasks`, and the ceiling: {"random": .., "walker": .., "expert": ..,
    "ceiling": ..} (policies the env cannot play, e.g. no expert, are left out)."""
    out = {}
    for policy in policies:
        if policy == "expert" and not hasattr(factory, "solve"):
            continue
        records = play(factory, tasks, policy, max_turns, k, seed)
        out[policy] = sum(r["won"] for r in records) / len(records)
    if hasattr(factory, "solve"):
        out["ceiling"] = ceiling(factory, tasks, max_turns)
    return out
