"""Behaviour-cloning warm start: expert turns come from the real step-mode engine and cloning fits them."""

import torch
from transformers import AutoModelForCausalLM

from epo_trl.envs.maze import MazeFactory
from epo_trl.rollout import RolloutConfig, RolloutEngine
from epo_trl.testing import build_tiny_model, build_tokenizer
from epo_trl.warmstart import PlanBackend, behaviour_clone, expert_turns, noisy_demonstrator


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


def test_noisy_demonstrator_relabels_with_admissible_actions():
    factory = MazeFactory(size=2, task="reach", distractors=0)
    tokenizer = build_tokenizer(factory.vocabulary())
    tasks = factory.tasks("train")[:8]
    config = RolloutConfig(max_turns=8, max_turn_tokens=12)
    samples = expert_turns(factory, tasks, tokenizer, config)
    assert noisy_demonstrator(samples, factory, tasks, tokenizer, config, noise=0.0) == samples
    noisy = noisy_demonstrator(samples, factory, tasks, tokenizer, config, noise=1.0, seed=3)
    assert [p for p, _, _ in noisy] == [p for p, _, _ in samples]  # same states, new labels
    changed = 0
    for (prompt, completion, mask), (_, expert, _) in zip(noisy, samples):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        assert text.startswith("<action>") and text.endswith("</action>") and completion[-1] == tokenizer.eos_token_id
        action = text.removeprefix("<action>").removesuffix("</action>")
        exits = tokenizer.decode(prompt).rsplit("exits : ", 1)[1].split(" .")[0].split()
        assert action == "look" or action.removeprefix("go ") in exits  # an admissible action of that state
        assert mask == [1] * len(completion)
        changed += completion != expert
    assert 0 < changed < len(samples)  # uniform over admissible actions: sometimes the expert's own move


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
