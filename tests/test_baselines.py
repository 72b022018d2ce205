"""Reference policies (epo_trl.rollout.baselines) against values computed by hand, and `epo-trl eval --policy`."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from epo_trl.envs.maze import MazeFactory
from epo_trl.rollout.baselines import baselines, ceiling, play

# A 2x2 `trail` maze is a corridor of 4 rooms (every spanning tree of a 4-cycle is a path) with the start at one end
# and the goal at the other, 3 moves away: the random policy's success has a closed form.
CORRIDOR = MazeFactory(size=2, task="trail", distractors=0, num_train=8)


def random_walk_success(turns: int) -> Fraction:
    """P(win within `turns`) for the uniform random admissible policy on the corridor, by dynamic programming.

    Rooms 0 (start) .. 3 (goal). At the start the admissible actions are `look` and one exit (1/2 each); in rooms 1
    and 2 `look`, back and forward (1/3 each)."""
    p = {0: Fraction(1), 1: Fraction(0), 2: Fraction(0)}
    won = Fraction(0)
    for _ in range(turns):
        nxt = {0: p[0] / 2 + p[1] / 3, 1: p[0] / 2 + p[1] / 3 + p[2] / 3, 2: p[1] / 3 + p[2] / 3}
        won += p[2] / 3
        p = nxt
    return won


def test_corridor_layout_is_what_the_closed_form_assumes():
    for task in CORRIDOR.tasks("train"):
        assert CORRIDOR.solve(task) and len(CORRIDOR.solve(task)) == 3
        env = CORRIDOR.make()
        env.reset(task)
        assert len(env.admissible_actions()) == 2  # look + the one exit


@pytest.mark.parametrize("turns", [3, 6, 10])
def test_random_policy_matches_dynamic_programming(turns):
    records = play(CORRIDOR, CORRIDOR.tasks("train"), "random", turns, k=500, seed=1)
    rate = sum(r["won"] for r in records) / len(records)
    expected = float(random_walk_success(turns))
    sigma = math.sqrt(expected * (1 - expected) / len(records))
    assert abs(rate - expected) < 4.5 * sigma, (rate, expected)
    assert random_walk_success(3) == Fraction(1, 18)  # 1/2 * 1/3 * 1/3: the only 3-turn win


def test_walker_never_turns_back_in_a_corridor_and_expert_is_the_ceiling():
    tasks = CORRIDOR.tasks("train")
    walker = play(CORRIDOR, tasks, "walker", 6, k=4)
    assert all(r["won"] and r["length"] == 3 and r["return"] == 10.0 for r in walker)
    assert not any(r["won"] for r in play(CORRIDOR, tasks, "walker", 2))
    assert ceiling(CORRIDOR, tasks, 2) == 0.0 and ceiling(CORRIDOR, tasks, 3) == 1.0
    assert baselines(CORRIDOR, tasks, 3, k=2) == {
        "random": pytest.approx(sum(r["won"] for r in play(CORRIDOR, tasks, "random", 3, k=2)) / 16),
        "walker": 1.0,
        "expert": 1.0,
        "ceiling": 1.0,
    }


def test_walker_takes_the_key_and_opens_the_door():
    """The walker picks up and opens what it is offered: it can win `key` mazes, which a pure exit walk cannot."""
    factory = MazeFactory(size=3, task="key", distractors=0, num_train=16)
    records = play(factory, factory.tasks("train"), "walker", 40, k=2)
    assert sum(r["won"] for r in records) / len(records) > 0.5
    assert sum(r["won"] for r in play(factory, factory.tasks("train"), "expert", 40)) == 16


def test_demo_setting_leaves_room_above_the_baselines():
    """The demo's maze (recipes/cpu/demo.yaml): explorers that do not read the signs stay far below the ceiling."""
    factory = MazeFactory(size=4, task="trail", distractors=0, num_train=64)
    ref = baselines(factory, factory.tasks("valid_seen"), 6, k=8)
    assert ref["ceiling"] == ref["expert"] == 1.0
    assert 0.03 < ref["random"] < 0.15 and 0.2 < ref["walker"] < 0.45, ref


def test_eval_cli_plays_a_reference_policy(tmp_path, capsys):
    from epo_trl.cli.evaluate import main

    out = tmp_path / "walker.json"
    kwargs = json.dumps({"size": 2, "task": "trail", "distractors": 0, "num_train": 8})
    argv = ["--policy", "walker", "--env", "maze", "--env_kwargs", kwargs, "--split", "train", "--max_turns", "6"]
    assert main([*argv, "--output", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["success_rate"] == 1.0 and summary["mean_length"] == 3.0 and summary["ceiling"] == 1.0
    assert "ceiling (share of tasks the expert wins within 6 turns): 1.000" in capsys.readouterr().out
