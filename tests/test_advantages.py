"""GiGPO's anchor-state step advantages (epo_trl/trainers/grpo/gigpo.py) and their use in step mode."""

import math

import pytest

from epo_trl.trainers.grpo.gigpo import combine, discounted_returns, step_advantages


def test_discounted_returns():
    assert discounted_returns([0.0, 0.0, 10.0], 0.5) == [2.5, 5.0, 10.0]
    assert discounted_returns([-0.1, 10.0], 1.0) == pytest.approx([9.9, 10.0])
    assert discounted_returns([], 0.9) == []


def test_step_advantages_compare_turns_from_the_same_state():
    # Group 0: three episodes start in room "A". Ep 0 goes right at once and wins, ep 1 detours and wins a turn
    # later, ep 2 never wins. Turn 1 of ep 1 and turn 1 of ep 2 both act from "B". Group 1 has an "A" too.
    groups = [0, 0, 0, 1]
    states = [["A"], ["A", "B"], ["A", "B"], ["A"]]
    rewards = [[10.0], [0.0, 10.0], [0.0, 0.0], [0.0]]
    adv = step_advantages(groups, states, rewards, gamma=0.5)
    start = [10.0, 5.0, 0.0]  # G at "A": 10, 0.5 * 10, 0
    mean = sum(start) / 3
    std = math.sqrt(sum((g - mean) ** 2 for g in start) / 2)  # sample std, like the group std of GRPO
    assert [adv[0][0], adv[1][0], adv[2][0]] == pytest.approx([(g - mean) / (std + 1e-4) for g in start])
    b = [10.0, 0.0]
    assert [adv[1][1], adv[2][1]] == pytest.approx(
        [(b[0] - 5) / (math.sqrt(50) + 1e-4), (b[1] - 5) / (math.sqrt(50) + 1e-4)]
    )
    assert adv[3] == [0.0]  # alone in its group's "A": no comparison
    # Unscaled: only the mean is removed; every step group sums to zero.
    raw = step_advantages(groups, states, rewards, gamma=0.5, scale=False)
    assert [raw[0][0], raw[1][0], raw[2][0]] == pytest.approx([g - mean for g in start])
    assert raw[1][1] + raw[2][1] == pytest.approx(0.0)


def test_combine_adds_the_weighted_step_term_and_zeroes_failed_episodes():
    out = combine([1.0, -1.0, math.nan], [[0.5, -0.5], [0.0], []], omega=2.0)
    assert out == [[2.0, 0.0], [-1.0], []]
    assert combine([math.nan], [[1.0, 1.0]])[0] == [0.0, 0.0]


def test_step_rollout_turn_advantages_gigpo_is_opt_in():
    """step_batch.turn_advantages: GRPO broadcast by default; with gigpo_omega, turns acting from the same
    observation inside one group get GiGPO's step term (history[t][0] is the observation turn t acted on)."""
    from types import SimpleNamespace

    import torch

    from epo_trl.envs.protocol import TaskSpec
    from epo_trl.rollout import RolloutConfig, StepRollout
    from epo_trl.rollout.episode import Episode, Turn
    from epo_trl.trainers.grpo.step_batch import turn_advantages

    def episode(observations, won, invalid=()):
        e = Episode(task=TaskSpec("maze", "reach", 2, 0), won=won, terminated=won)
        for t, obs in enumerate(observations):
            action = None if t in invalid else "go north"
            e.turns.append(Turn([1], [2], [0.0], "", action, None, False))
            e.history.append((obs, action or "invalid action"))
        return e

    # One group of two: both start in room "A"; ep 0 wins at once, ep 1 makes an invalid turn in "A", then a
    # move from "A" that does not win.
    episodes = [episode(["A"], True), episode(["A", "A"], False, invalid={0})]

    def trainer(omega):
        return SimpleNamespace(
            num_generations=2,
            model=SimpleNamespace(training=True),
            accelerator=SimpleNamespace(process_index=0),
            args=SimpleNamespace(gigpo_omega=omega),
        )

    adv = torch.tensor([0.7, -0.7])
    rollout = StepRollout(None, RolloutConfig())
    flat = lambda rows: [a for row in rows for a in row]  # noqa: E731
    assert flat(turn_advantages(rollout, episodes, adv, trainer(0.0))) == pytest.approx([0.7, -0.7, -0.7])
    out = turn_advantages(rollout, episodes, adv, trainer(0.5))
    # Returns from "A" (gamma 0.95): ep 0 turn 0: 10; ep 1 turn 0: -0.1 + 0.95 * 0 = -0.1; ep 1 turn 1: 0.
    expected = step_advantages([0, 0], [["A"], ["A", "A"]], [[10.0], [-0.1, 0.0]])
    assert [len(row) for row in out] == [1, 2]
    assert flat(out) == pytest.approx([0.7 + 0.5 * expected[0][0], *[-0.7 + 0.5 * s for s in expected[1]]])
    assert expected[0][0] > 0 > expected[1][1] > expected[1][0]
