"""EPOTrainer: MultiTurnGRPOTrainer plus EPO's entropy smoothing, phase schedule and per-turn entropy history.

The only change w.r.t. the base is `method_loss` (E4, E5) and the history kept across steps (E3); the math lives
in `epo_math`, the multi-turn machinery in `trainers/grpo`.
"""

from __future__ import annotations

import torch

from ..grpo.grpo_trainer import ActionTokens, MultiTurnGRPOTrainer, arxiv_paper
from ..grpo.turn_math import masked_token_mean
from .epo_config import EPOConfig
from .epo_math import EntropyHistory, phase_schedule, smoothing_penalty

# What `_epo_sums` holds, in its order: the step's smoothing penalty sum, out-of-band tokens and action tokens.
EPO_SUMS = ("epo/smooth_penalty_sum", "epo/out_of_band_tokens", "epo/action_tokens")


class EPOTrainer(MultiTurnGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same constructor) that trains with EPO.

    Loss = GRPO loss - entropy_coef * L_H + entropy_coef * smoothing_coef * beta_k * L_smooth, where L_H
    is TRL's own entropy bonus (`entropy_coef`), so the bonus is never counted twice.
    """

    _tag_names = ["trl", "grpo", "multi-turn", "epo"]
    _name = "EPO"
    _paper = arxiv_paper(
        "epo2025",
        "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
        "2509.22576",
        2025,
    )
    config_class = EPOConfig
    checkpoint_keys = ("entropy_history",)

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self.entropy_history = EntropyHistory(self.args.entropy_history_window)
        self._epo_sums: torch.Tensor | None = None  # this step's (penalty sum, out-of-band tokens, tokens)

    def schedule_weight(self) -> float:
        """beta_k at the current optimizer step (E6), or 1 for the constant schedule."""
        if self.args.entropy_schedule == "constant":
            return 1.0
        horizon = self.args.schedule_horizon or max(self.state.max_steps, 1)
        return phase_schedule(self.state.global_step, horizon, self.args.schedule_gamma)

    # --- loss -----------------------------------------------------------------------------------------
    def method_loss(self, model, inputs, tokens: ActionTokens):
        extra = super().method_loss(model, inputs, tokens)
        a = self.args
        reference, has_reference = self.entropy_history.reference()  # (E3), fixed during the step
        penalty, active = smoothing_penalty(  # (E4)
            tokens.entropies,
            tokens.turn_ids,
            reference,
            has_reference,
            a.smoothing_kappa_low,
            a.smoothing_kappa_high,
            a.smoothing_start_turn,
        )
        if self.model.training:
            mask = tokens.mask.bool()
            sums = torch.stack(
                [
                    (penalty.detach() * mask).sum().double(),
                    (active & (penalty.detach() > 0) & mask).sum().double(),
                    mask.sum().double(),
                ]
            )  # on the device: moved once per step, in the base's reduce
            self._epo_sums = sums if self._epo_sums is None else self._epo_sums + sums
        weight = tokens.entropy_coef * a.smoothing_coef * self.schedule_weight()  # lam * c * beta_k
        if not a.smoothing or weight == 0.0:
            return extra
        # Same normalisation as TRL's entropy bonus: a token mean per micro-batch, scaled for accumulation.
        return extra + weight * masked_token_mean(penalty, tokens.mask) / tokens.accumulation  # (E5) + L_smooth term

    def step_sums(self) -> dict[str, torch.Tensor]:
        mine = self._epo_sums
        if mine is None:
            mine = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        self._epo_sums = None
        return {**super().step_sums(), **dict(zip(EPO_SUMS, mine))}

    def on_step_end(self, turn_means: dict[int, float], sums: dict[str, torch.Tensor]) -> None:
        """Log EPO's step metrics and update the history (E2, E3) with the step's per-turn means."""
        super().on_step_end(turn_means, sums)
        pen_sum, oob, tokens = (float(sums[key]) for key in EPO_SUMS)
        reference, has_reference = self.entropy_history.reference()
        self.log_metric("epo/beta", self.schedule_weight())
        self.log_metric("epo/smooth_penalty", pen_sum / max(tokens, 1.0))
        self.log_metric("epo/out_of_band_frac", oob / max(tokens, 1.0))
        if has_reference.any():
            self.log_metric("epo/ref_entropy_mean", reference[has_reference].mean().item())
        self.entropy_history.update(turn_means)  # (E3): used from the next step on

    # --- checkpointing --------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        return {**super().state_for_checkpoint(), "entropy_history": self.entropy_history.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.entropy_history.load_state_dict(state["entropy_history"])
