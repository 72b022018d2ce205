"""A short learning check on held-out mazes unseen by content: a model trained on `train` mazes must beat policies
that learn nothing on mazes it never saw (the demo's setting, recipes/cpu/demo.yaml: 4x4 `trail`, 6 turns)."""

from __future__ import annotations

import pytest

SETTING = {"size": 4, "task": "trail", "distractors": 0, "num_train": 64}
HELD_OUT = 32


@pytest.mark.slow
def test_cloning_the_expert_generalises_to_unseen_mazes(tmp_path):
    """Behaviour cloning on the 64 train mazes (the demo's warm start, first phase; fixed seed, one torch thread so
    the run is the same under load) until the model wins 90% of sampled train games. On 32 `valid_seen` mazes, none
    of which is in train, the random model wins nothing and the trained one beats the best policy that learns nothing
    (the walker, which does not read the signs) by more than 0.2. A model that memorised train mazes instead of
    reading signs would stay near the walker here."""
    import torch

    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, env_words
    from epo_trl.models.warmstart import warm_start
    from epo_trl.rollout import RolloutConfig
    from epo_trl.rollout.baselines import baselines
    from epo_trl.rollout.evaluation import sampled_summary

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        factory = MazeFactory(**SETTING)
        config = RolloutConfig(max_turns=6, max_turn_tokens=12, prompt_history_pairs=2, require_tags=True,
                               num_workers=1)  # fmt: skip
        train, held_out = factory.tasks("train"), factory.tasks("valid_seen")[:HELD_OUT]
        assert not {factory.content_key(t) for t in held_out} & {factory.content_key(t) for t in train}
        path = str(tmp_path / "model")
        build_tiny_model(path, extra_words=env_words(factory), hidden_size=64, head_dim=32, seed=0)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

        def success() -> float:
            model = AutoModelForCausalLM.from_pretrained(path)
            return sampled_summary(model, tokenizer, factory, held_out, config, 1.0, 0, "trajectory")["success_rate"]

        before = success()
        summary = warm_start(path, factory, train, config, "trajectory", steps=1200, seed=0, target_success=0.9)
        after = success()
    finally:
        torch.set_num_threads(threads)
    reference = baselines(factory, held_out, config.max_turns, k=8)
    assert summary["train_success"] >= 0.9, summary
    assert before <= reference["random"], (before, reference)
    assert after >= reference["walker"] + 0.2, (after, reference, summary["steps"])
