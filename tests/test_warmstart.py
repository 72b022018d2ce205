"""Behaviour-cloning warm start: expert turns come from the real step-mode engine and cloning fits them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from epo_trl.envs.maze import MazeFactory
from epo_trl.models.tiny import build_tiny_model, build_tokenizer
from epo_trl.models.warmstart import PlanBackend, behaviour_clone, expert_turns, noisy_plans, warm_start
from epo_trl.rollout import RolloutConfig, RolloutEngine


def test_expert_turns_are_winning_step_mode_turns():
    factory = MazeFactory(size=2, task="reach", distractors=0)
    tokenizer = build_tokenizer(factory.vocabulary())
    tasks = factory.tasks("train")[:6]
    config = RolloutConfig(max_turns=8, max_turn_tokens=12)
    plans = [factory.solve(t) for t in tasks]
    engine = RolloutEngine(factory, tokenizer, config)
    result = engine.run(tasks, PlanBackend(plans, tokenizer), "step")
    engine.close()
    assert all(e.won for e in result.episodes)
    assert [len(e.turns) for e in result.episodes] == [len(p) for p in plans]
    pairs = expert_turns(factory, tasks, tokenizer, config)
    assert len(pairs) == sum(map(len, plans))
    assert all(mask == [1] * len(c) for _, c, mask in pairs)
    first = tokenizer.decode(pairs[0][1], skip_special_tokens=True)
    assert first == f"<action>{plans[0][0]}</action>"
    assert "your task is to" in tokenizer.decode(pairs[0][0])
    # trajectory mode: one sample per episode; the loss mask is the env_mask (actions 1, observations 0)
    rows = expert_turns(factory, tasks, tokenizer, config, mode="trajectory")
    assert len(rows) == len(tasks)
    _, completion, mask = rows[0]
    actions = tokenizer.decode([t for t, m in zip(completion, mask) if m], skip_special_tokens=True)
    assert actions == "".join(f"<action>{a}</action>" for a in plans[0])
    assert 0 < sum(mask) < len(mask)


def test_behaviour_cloning_fits_the_expert(tmp_path):
    factory = MazeFactory(size=2, task="reach", distractors=0)
    path = build_tiny_model(str(tmp_path / "m"), extra_words=factory.vocabulary(), hidden_size=32)
    tokenizer = build_tokenizer(factory.vocabulary())
    pairs = expert_turns(factory, factory.tasks("train")[:16], tokenizer, RolloutConfig(max_turns=8))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    losses = behaviour_clone(model, pairs, steps=60, pad_token_id=tokenizer.pad_token_id)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_noisy_plans_mix_random_admissible_moves_with_the_replanned_expert():
    factory = MazeFactory(size=2, task="reach", distractors=0)
    tasks = factory.tasks("train")[:32]
    assert noisy_plans(factory, tasks, max_turns=6, noise=0.0) == [factory.solve(t) for t in tasks]
    plans = noisy_plans(factory, tasks, max_turns=6, noise=0.7, seed=3)
    assert plans == noisy_plans(factory, tasks, max_turns=6, noise=0.7, seed=3)  # seeded
    detours = wins = 0
    for task, plan in zip(tasks, plans):
        env = factory.make()
        env.reset(task)
        for i, action in enumerate(plan):
            assert action in env.admissible_actions()
            detours += action != factory.solve(task, plan[:i])[0]
            _, _, done, truncated, info = env.step(action)
            assert not truncated and done == (i == len(plan) - 1 and info["won"])  # a plan stops when it wins ...
        wins += info["won"]
        assert info["won"] or len(plan) == 6  # ... or at max_turns
    assert detours > 0 and 0 < wins < len(tasks)


def test_noisy_plans_render_as_episodes_in_both_modes():
    factory = MazeFactory(size=2, task="reach", distractors=0)
    tokenizer = build_tokenizer(factory.vocabulary())
    tasks = factory.tasks("train")[:8]
    config = RolloutConfig(max_turns=5, max_turn_tokens=12)
    plans = noisy_plans(factory, tasks, config.max_turns, noise=0.9, seed=1)
    assert any(len(p) == 5 for p in plans)  # some never win: they still render, to max_turns
    steps = expert_turns(factory, tasks, tokenizer, config, "step", plans)
    assert [tokenizer.decode(c, skip_special_tokens=True) for _, c, _ in steps] == [
        f"<action>{a}</action>" for p in plans for a in p
    ]
    rows = expert_turns(factory, tasks, tokenizer, config, "trajectory", plans)
    for (_, completion, mask), plan in zip(rows, plans):
        actions = tokenizer.decode([t for t, m in zip(completion, mask) if m], skip_special_tokens=True)
        assert actions == "".join(f"<action>{a}</action>" for a in plan)


def test_warm_start_rejects_noise_without_a_noisy_phase(tmp_path):
    factory = MazeFactory(size=2, task="reach", distractors=0)
    path = build_tiny_model(str(tmp_path / "m"), extra_words=factory.vocabulary(), hidden_size=16)
    with pytest.raises(ValueError, match="noisy_steps > 0"):
        warm_start(path, factory, factory.tasks("train")[:2], RolloutConfig(), steps=1, noise=0.5)
    with pytest.raises(ValueError, match="must be in"):
        warm_start(path, factory, factory.tasks("train")[:2], RolloutConfig(), steps=1, noise=1.5, noisy_steps=1)


def test_behaviour_cloning_stops_when_asked(tmp_path):
    factory = MazeFactory(size=2, task="reach", distractors=0)
    path = build_tiny_model(str(tmp_path / "m"), extra_words=factory.vocabulary(), hidden_size=16)
    tokenizer = build_tokenizer(factory.vocabulary())
    pairs = expert_turns(factory, factory.tasks("train")[:4], tokenizer, RolloutConfig(max_turns=8))
    model = AutoModelForCausalLM.from_pretrained(path)
    calls = []

    def stop(step):
        calls.append((step, model.training))
        return step >= 10

    losses = behaviour_clone(model, pairs, steps=50, batch_size=2, stop=stop, check_every=5)
    assert len(losses) == 10 and calls == [(5, False), (10, False)]  # checked in eval mode, stopped at step 10


def test_expert_turns_reuses_envs_across_render_batches(monkeypatch):
    """Rendering in batches gives the same samples as one lockstep run, on as many envs as one batch holds."""
    from countdown_env import WORDS, CountdownFactory

    from epo_trl.models import warmstart

    tok = build_tokenizer(WORDS)
    config = RolloutConfig(max_turns=5, max_turn_tokens=12, require_tags=False)
    rendered = {}
    for batch in (3, 100):
        factory = CountdownFactory()
        tasks = factory.tasks()  # 8 tasks, won after 1, 2, 3, 4, 1, 2, 3, 4 valid actions
        monkeypatch.setattr(warmstart, "RENDER_BATCH", batch)
        rendered[batch] = expert_turns(factory, tasks, tok, config, "step", [["go"] * t.variation for t in tasks])
        assert len(factory.made) == min(batch, 8)
        assert sum(1 for op, *_ in factory.log if op == "reset") == 8
    assert len(rendered[3]) == 20  # one sample per turn: 1+2+3+4+1+2+3+4
    assert rendered[3] == rendered[100]
