"""EPOTrainer on real TRL training steps with a tiny offline model (issue: EPO core)."""

import json
import os
import shutil

import pytest
import torch
from helpers import (
    TRL_FORWARD,
    assert_trains_like,
    length_reward,
    prompt_dataset,
    scripted_rollout,
    step_mode_batch,
    tiny_args,
    train_recorded,
)
from trl import GRPOConfig, GRPOTrainer

from epo_trl import EPOConfig, EPOTrainer


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_equivalent_to_grpo_when_epo_is_off(tiny_model, tmp_path):
    grpo = train_recorded(
        lambda: GRPOTrainer(
            tiny_model, length_reward, args=tiny_args(GRPOConfig, tmp_path / "g"), train_dataset=prompt_dataset()
        )
    )
    epo = train_recorded(
        lambda: EPOTrainer(
            tiny_model,
            length_reward,
            args=tiny_args(EPOConfig, tmp_path / "e", entropy_coef=0.0, smoothing=False, **TRL_FORWARD),
            train_dataset=prompt_dataset(),
        )
    )
    assert_trains_like(grpo, epo, atol=1e-7)


def test_smoothing_changes_the_gradient(tiny_model, tmp_path):
    """Out-of-band entropy: runs that differ only in `smoothing` diverge (the released penalty could not)."""
    weights, logs = {}, {}
    for smoothing in (True, False):
        torch.manual_seed(0)
        trainer = EPOTrainer(
            tiny_model,
            length_reward,
            args=tiny_args(
                EPOConfig,
                tmp_path / str(smoothing),
                max_steps=1,
                entropy_coef=0.1,
                smoothing=smoothing,
                smoothing_coef=1.0,
                entropy_schedule="constant",
            ),
            train_dataset=prompt_dataset(),
            rollout_func=scripted_rollout(),
        )
        # A reference of 1.0 nat puts the tiny model's ~6-nat entropy far above the band (kappa_high * 1.0).
        trainer.entropy_history.update({0: 1.0, 1: 1.0, 2: 1.0})
        trainer.train()
        weights[smoothing] = _weights(trainer.model)
        logs[smoothing] = [h for h in trainer.state.log_history if "epo/out_of_band_frac" in h][0]
    assert logs[True]["epo/out_of_band_frac"] == pytest.approx(1.0)
    assert logs[True]["epo/smooth_penalty"] > 1.0  # H - 2 * 1.0 with H ~ 6 nats
    diff = max((weights[True][k] - weights[False][k]).abs().max().item() for k in weights[True])
    assert diff > 1e-6


def test_multi_turn_run_logs_metrics_and_per_turn_references(tiny_model, tmp_path):
    trainer = EPOTrainer(
        tiny_model,
        length_reward,
        args=tiny_args(EPOConfig, tmp_path, max_steps=3),
        train_dataset=prompt_dataset(),
        rollout_func=scripted_rollout(num_turns=3),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "epo/beta" in h]
    assert len(logs) == 3
    for key in [
        "epo/beta",
        "epo/smooth_penalty",
        "epo/out_of_band_frac",
        "epo/num_turns",
        "epo/entropy_turn_first",
        "epo/entropy_turn_last",
        "epo/entropy_turn_var",
        "epo/turn_entropy/0",
        "epo/turn_entropy/2",
    ]:
        assert key in logs[-1], key
    assert "epo/ref_entropy_mean" in logs[1]  # from the second step on there is a reference
    assert logs[0]["epo/num_turns"] == 3
    assert trainer.entropy_history.turns() == [0, 1, 2]
    assert trainer.entropy_history.num_steps == 3
    # beta follows the phase schedule with K = max_steps = 3: beta(0) = 1, beta(1) = 1 - 0.2 (1 - e^{-4/3})
    assert logs[0]["epo/beta"] == pytest.approx(1.0)
    assert logs[1]["epo/beta"] == pytest.approx(1 - 0.2 * (1 - 2.718281828 ** (-4 / 3)), rel=1e-6)


def test_single_turn_data_is_turn_zero(tiny_model, tmp_path):
    trainer = EPOTrainer(
        tiny_model, length_reward, args=tiny_args(EPOConfig, tmp_path), train_dataset=prompt_dataset()
    )
    trainer.train()
    assert trainer.entropy_history.turns() == [0]


def test_step_mode_turn_ids_feed_the_reference(tiny_model, tmp_path):
    """Rows that carry `turn_ids` (one row per episode turn) are recorded under that turn."""
    trainer = EPOTrainer(
        tiny_model, length_reward, args=tiny_args(EPOConfig, tmp_path), train_dataset=prompt_dataset()
    )
    tok = trainer.processing_class
    prompt = torch.tensor([tok("look")["input_ids"] * 2] * 2)
    completion = torch.tensor([tok(" go north key")["input_ids"], tok(" open door key")["input_ids"]])
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.tensor([[1] * completion.size(1), [1, 1] + [0] * (completion.size(1) - 2)]),
        "advantages": torch.tensor([1.0, -1.0]),
        "num_items_in_batch": torch.tensor(float(completion.size(1) + 2)),
        "turn_ids": torch.tensor([3, 5]),
    }
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
    trainer.compute_loss(trainer.model, inputs)
    assert trainer.entropy_history.turns() == [3, 5]


def test_checkpoint_resume_matches_uninterrupted(tiny_model, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, entropy_coef=0.05, smoothing_coef=1.0)

    def make(out):
        return EPOTrainer(
            tiny_model,
            length_reward,
            args=tiny_args(EPOConfig, out, **common),
            train_dataset=prompt_dataset(),
            rollout_func=scripted_rollout(),
        )

    full = make(tmp_path / "full")
    full.train()
    # Resume a fresh trainer from the uninterrupted run's step-2 checkpoint.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    with open(tmp_path / "full" / "checkpoint-2" / "epo_state.json") as f:
        assert json.load(f)["entropy_history"]["num_steps"] == 2
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    assert resumed.entropy_history.state_dict() == full.entropy_history.state_dict()
    full_loss = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    res_loss = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [s for s in sorted(res_loss) if s > 2] == [3, 4]  # steps 1-2 come from the restored trainer_state
    for step in (3, 4):
        assert res_loss[step] == pytest.approx(full_loss[step], rel=1e-5, abs=1e-7)
    with open(tmp_path / "resumed" / "checkpoint-4" / "epo_state.json") as f:
        saved = json.load(f)
    assert saved["entropy_history"] == full.entropy_history.state_dict()
    assert saved["last_step_entropy"] == full.last_step_entropy


def test_resume_from_foreign_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    trainer = EPOTrainer(
        tiny_model, length_reward, args=tiny_args(EPOConfig, tmp_path), train_dataset=prompt_dataset()
    )
    os.makedirs(tmp_path / "ckpt")
    from epo_trl.trainers.checkpoints import CheckpointError

    with pytest.raises(
        CheckpointError, match=r"ckpt/epo_state.json is missing: EPOTrainer writes it before any other"
    ):
        EPOTrainer._load_optimizer_and_scheduler(trainer, str(tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "field,value",
    [
        ("entropy_coef", -0.1),
        ("smoothing_coef", -1.0),
        ("smoothing_kappa_low", -0.5),
        ("smoothing_kappa_high", 0.5),  # < kappa_low below
        ("entropy_history_window", 0),
        ("smoothing_start_turn", -1),
        ("entropy_schedule", "cosine"),
        ("schedule_gamma", -1.0),
        ("schedule_horizon", 0),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value):
    kw = {field: value}
    if field == "smoothing_kappa_high":
        kw["smoothing_kappa_low"] = 1.0
    with pytest.raises(ValueError, match=field):
        EPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kw)


def test_grpo_config_is_rejected_with_a_hint(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="EPOConfig"):
        EPOTrainer(tiny_model, length_reward, args=tiny_args(GRPOConfig, tmp_path), train_dataset=prompt_dataset())


@pytest.mark.parametrize("entropy_coef", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "luspo", "sapo", "bnpo", "dapo", "cispo"])
def test_row_chunked_backward_gives_the_same_gradient(tiny_model, tmp_path, loss_type, entropy_coef):
    grads, losses = {}, {}
    for limit in (0, 2):  # 0 = one pass over 5 rows; 2 = passes of 2 + 2 + 1 rows
        trainer = EPOTrainer(
            tiny_model,
            length_reward,
            args=tiny_args(EPOConfig, tmp_path / str(limit), loss_type=loss_type, entropy_coef=entropy_coef,
                           smoothing_coef=1.0, entropy_schedule="constant", max_rows_per_backward=limit),
            train_dataset=prompt_dataset(),
        )  # fmt: skip
        trainer.entropy_history.update({0: 1.0, 1: 9.0, 2: 1.0})  # turns 0 and 2 above the band, turn 1 inside
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        losses[limit] = trainer.training_step(trainer.model, step_mode_batch(trainer.processing_class), None).item()
        grads[limit] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        history = trainer.entropy_history.state_dict()
        assert history["num_steps"] == 2  # the chunks of one micro-batch update the history once
    assert losses[0] == pytest.approx(losses[2], rel=1e-5, abs=1e-7)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-4, atol=1e-7)


def _adaptive_step_loss(tiny_model, out, smoothing, world_entropy, delta):
    """One training step of a 5-row batch (every turn far above its band) under TRL's adaptive entropy coefficient."""
    trainer = EPOTrainer(
        tiny_model,
        length_reward,
        args=tiny_args(EPOConfig, out, use_adaptive_entropy=True, entropy_coef=0.5, entropy_coef_delta=delta,
                       entropy_coef_max=10.0, entropy_target=100.0, smoothing=smoothing, smoothing_coef=1.0,
                       entropy_schedule="constant", max_rows_per_backward=0),
        train_dataset=prompt_dataset(),
    )  # fmt: skip
    trainer.entropy_history.update({0: 1e-3, 1: 1e-3, 2: 1e-3})
    trainer._last_world_entropy = world_entropy  # the entropy TRL's controller measured at the previous step
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer.training_step(trainer.model, step_mode_batch(trainer.processing_class), None).item()
    return loss, trainer.entropy_coef


def test_adaptive_entropy_coef_drives_both_epo_terms(tiny_model, tmp_path):
    # Entropy above TRL's target: TRL applies no bonus this step, so EPO's smoothing is off too (one lambda = 0).
    on, _ = _adaptive_step_loss(tiny_model, tmp_path / "a", True, world_entropy=500.0, delta=0.0)
    off, _ = _adaptive_step_loss(tiny_model, tmp_path / "b", False, world_entropy=500.0, delta=0.0)
    assert on == pytest.approx(off, abs=1e-7)
    # Entropy below the target: TRL applies lambda = 0.5 and raises it by delta at the end of the step; the smoothing
    # term must use the lambda the step's bonus used (0.5), whatever delta is.
    diffs = []
    for delta in (0.0, 2.0):
        on, coef = _adaptive_step_loss(tiny_model, tmp_path / f"c{delta}", True, world_entropy=0.1, delta=delta)
        off, _ = _adaptive_step_loss(tiny_model, tmp_path / f"d{delta}", False, world_entropy=0.1, delta=delta)
        assert coef == pytest.approx(0.5 + delta)  # TRL did update its coefficient during the step
        diffs.append(on - off)
    assert diffs[0] > 0.1  # lambda * c * L_smooth with every token far above its band
    assert diffs[1] == pytest.approx(diffs[0], rel=1e-5)
