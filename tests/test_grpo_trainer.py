"""MultiTurnGRPOTrainer (`--algo grpo`) trains exactly as TRL's GRPOTrainer on what TRL can express: same seed, tiny
model, fp32; the same loss, gradients at every optimizer step and final weights, for every loss type TRL allows."""

import pytest
from helpers import (
    TRL_FORWARD,
    assert_trains_like,
    length_reward,
    prompt_dataset,
    scripted_rollout,
    tiny_args,
    train_recorded,
    trl_loss_types,
)
from trl import GRPOConfig, GRPOTrainer

from epo_trl import MultiTurnGRPOConfig, MultiTurnGRPOTrainer


def _pair(tiny_model, out, **kw):
    """(TRL's run, ours) on the same data and config."""
    if kw.get("loss_type") == "luspo":
        kw["importance_sampling_level"] = "sequence"  # TRL requires it for luspo

    def run(trainer_cls, config_cls, name):
        args = tiny_args(config_cls, out / name, **{k: v for k, v in kw.items() if k != "rollout_func"})
        extra = {"rollout_func": kw["rollout_func"]} if "rollout_func" in kw else {}
        return train_recorded(
            lambda: trainer_cls(tiny_model, length_reward, args=args, train_dataset=prompt_dataset(), **extra)
        )

    trl_run = run(GRPOTrainer, GRPOConfig, "trl")
    kw.update(TRL_FORWARD)
    return trl_run, run(MultiTurnGRPOTrainer, MultiTurnGRPOConfig, "ours")


@pytest.mark.parametrize("loss_type", trl_loss_types())
def test_single_turn_equals_trl(tiny_model, tmp_path, loss_type):
    """TRL's own generation (HF generate) and batch; no entropy bonus (TRL's default)."""
    trl_run, ours = _pair(tiny_model, tmp_path, loss_type=loss_type)
    assert_trains_like(trl_run, ours, atol=1e-6)


@pytest.mark.parametrize("loss_type", trl_loss_types())
def test_multi_turn_trajectory_equals_trl(tiny_model, tmp_path, loss_type):
    """Multi-turn completions of different lengths with environment tokens masked (TRL's rollout_func contract) and
    TRL's entropy bonus on: the base's per-turn bookkeeping changes nothing TRL computes."""
    rollout = scripted_rollout(num_turns=3)
    trl_run, ours = _pair(tiny_model, tmp_path, loss_type=loss_type, rollout_func=rollout, entropy_coef=0.1)
    assert_trains_like(trl_run, ours, atol=1e-6)
