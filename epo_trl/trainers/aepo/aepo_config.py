"""AEPOConfig: MultiTurnGRPOConfig plus AEPO's target-entropy control (docs/method.md, "AEPO")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..grpo.grpo_config import MultiTurnGRPOConfig, check

ESTIMATORS = ("full", "sampled")


@dataclass
class AEPOConfig(MultiTurnGRPOConfig):
    r"""
    Configuration class for [`AEPOTrainer`]: every [`MultiTurnGRPOConfig`] (and so [`~trl.GRPOConfig`]) parameter,
    plus AEPO's. AEPO is GRPO + `aepo_coef * L_reg`; TRL's own entropy bonus (`entropy_coef`) stays available.

    Parameters:
        aepo_target_entropy (`float`, *optional*, defaults to `0.5`):
            H*: target token entropy in nats (the released headline runs used 0.75).
        aepo_temperature_high (`float`, *optional*, defaults to `1.2`):
            T_high (> 1): sampling temperature of the regularisation samples while H <= H* (raises entropy).
        aepo_temperature_low (`float`, *optional*, defaults to `0.8`):
            T_low (in (0, 1)): sampling temperature while H > H* (lowers entropy).
        aepo_coef (`float`, *optional*, defaults to `0.02`):
            alpha: weight of L_reg. The released code had no explicit alpha: it substituted up to 60 kept rows
            into a 2560-row batch, i.e. alpha ~ 60 / 2560 ~ 0.023 when the cap is reached. `0` disables AEPO.
        aepo_resample_share (`float`, *optional*, defaults to `0.25`):
            Share of each rank's distinct prompts re-sampled every generation step (at least one prompt).
        aepo_num_resamples (`int`, *optional*, defaults to `5`):
            n: completions (or episodes) sampled per re-sampled prompt; the group for the advantage.
        aepo_advantage_threshold (`float`, *optional*, defaults to `0.05`):
            A re-sample is kept when its reward minus its group's mean reward exceeds this.
        aepo_max_kept (`int`, *optional*, defaults to `60`):
            Global cap (all ranks) on kept samples per generation step while H <= H*.
        aepo_max_kept_above_target (`int`, *optional*, defaults to `30`):
            Global cap while H > H*.
        aepo_entropy_estimator (`str`, *optional*, defaults to `"full"`):
            `"full"`: full-vocabulary token entropy of the last optimizer step (TRL's); `"sampled"`: mean
            -log pi of the sampled action tokens of the last step (the released estimator).
    """

    aepo_target_entropy: float = field(
        default=0.5,
        metadata={"help": "H*: target token entropy in nats (> 0; released headline runs: 0.75)."},
    )
    aepo_temperature_high: float = field(
        default=1.2,
        metadata={"help": "T_high (> 1): temperature of the regularisation samples while H <= H*."},
    )
    aepo_temperature_low: float = field(
        default=0.8,
        metadata={"help": "T_low (in (0, 1)): temperature of the regularisation samples while H > H*."},
    )
    aepo_coef: float = field(
        default=0.02,
        metadata={"help": "alpha (>= 0): weight of L_reg; ~60/2560 matches the released runs. 0 disables AEPO."},
    )
    aepo_resample_share: float = field(
        default=0.25,
        metadata={"help": "Share (in (0, 1]) of each rank's distinct prompts re-sampled per generation step."},
    )
    aepo_num_resamples: int = field(
        default=5,
        metadata={"help": "n (>= 2): samples per re-sampled prompt, the group of the within-group advantage."},
    )
    aepo_advantage_threshold: float = field(
        default=0.05,
        metadata={"help": "Keep a re-sample when reward - group mean > this (>= 0)."},
    )
    aepo_max_kept: int = field(
        default=60,
        metadata={"help": "Global cap (>= 1) on kept samples per generation step while H <= H*."},
    )
    aepo_max_kept_above_target: int = field(
        default=30,
        metadata={"help": "Global cap (>= 0) on kept samples per generation step while H > H*."},
    )
    aepo_entropy_estimator: str = field(
        default="full",
        metadata={
            "help": "Entropy H compared with H*: full-vocabulary token entropy, or the sampled -log pi estimator.",
            "choices": list(ESTIMATORS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.aepo_target_entropy > 0, "aepo_target_entropy", self.aepo_target_entropy, "> 0 (nats)")
        check(self.aepo_temperature_high > 1, "aepo_temperature_high", self.aepo_temperature_high, "> 1")
        check(0 < self.aepo_temperature_low < 1, "aepo_temperature_low", self.aepo_temperature_low, "in (0, 1)")
        check(self.aepo_coef >= 0, "aepo_coef", self.aepo_coef, ">= 0 (use 0 to disable AEPO)")
        check(0 < self.aepo_resample_share <= 1, "aepo_resample_share", self.aepo_resample_share, "in (0, 1]")
        check(self.aepo_num_resamples >= 2, "aepo_num_resamples", self.aepo_num_resamples, ">= 2 (a group)")
        check(
            self.aepo_advantage_threshold >= 0,
            "aepo_advantage_threshold",
            self.aepo_advantage_threshold,
            ">= 0 (only above-mean samples are reinforced)",
        )
        check(self.aepo_max_kept >= 1, "aepo_max_kept", self.aepo_max_kept, ">= 1 (use aepo_coef=0 to disable)")
        check(
            self.aepo_max_kept_above_target >= 0,
            "aepo_max_kept_above_target",
            self.aepo_max_kept_above_target,
            ">= 0",
        )
        check(
            self.aepo_entropy_estimator in ESTIMATORS,
            "aepo_entropy_estimator",
            self.aepo_entropy_estimator,
            f"one of {ESTIMATORS}",
        )
