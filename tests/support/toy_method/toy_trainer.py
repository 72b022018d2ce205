import torch

from epo_trl.trainers.grpo import MultiTurnGRPOTrainer
from epo_trl.trainers.grpo.grpo_trainer import ActionTokens
from epo_trl.trainers.grpo.turn_math import masked_token_mean

from .toy_config import ToyConfig


class ToyTrainer(MultiTurnGRPOTrainer):
    _tag_names = ["trl", "grpo", "multi-turn", "toy"]
    _name = "Toy"
    config_class = ToyConfig
    checkpoint_keys = ("toy_steps",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.toy_steps = 0
        self._toy_tokens = 0.0

    def method_loss(self, model, inputs, tokens: ActionTokens):
        extra = super().method_loss(model, inputs, tokens)
        self._toy_tokens += float(tokens.mask.sum())
        return extra - self.args.toy_coef * masked_token_mean(tokens.entropies, tokens.mask) / tokens.accumulation

    def step_sums(self) -> dict[str, torch.Tensor]:
        sums = super().step_sums()
        sums["toy/tokens"] = torch.tensor(self._toy_tokens, dtype=torch.float64, device=self.accelerator.device)
        return sums

    def on_step_end(self, turn_means: dict[int, float], sums: dict[str, torch.Tensor]) -> None:
        super().on_step_end(turn_means, sums)
        self.toy_steps += 1
        self._toy_tokens = 0.0
        self.log_metric("toy/steps", float(self.toy_steps))
        self.log_metric("toy/tokens", float(sums["toy/tokens"]))

    def state_for_checkpoint(self) -> dict:
        return {**super().state_for_checkpoint(), "toy_steps": self.toy_steps}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.toy_steps = int(state["toy_steps"])
