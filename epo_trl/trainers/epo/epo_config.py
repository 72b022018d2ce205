"""EPOConfig: MultiTurnGRPOConfig plus the fields of EPO's entropy control (docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..grpo.grpo_config import MultiTurnGRPOConfig, check

SCHEDULES = ("phase", "constant")


@dataclass
class EPOConfig(MultiTurnGRPOConfig):
    r"""
    Configuration class for [`EPOTrainer`]: every [`MultiTurnGRPOConfig`] (and so [`~trl.GRPOConfig`]) parameter,
    plus EPO's.

    Loss (docs/method.md): `L = L_GRPO - entropy_coef * L_H + entropy_coef * smoothing_coef * beta_k * L_smooth`,
    where `L_H` is TRL's own entropy bonus (token mean over action tokens) and `L_smooth` the hinge penalty
    that keeps each turn's entropy inside `[smoothing_kappa_low, smoothing_kappa_high] x` its historical mean.

    Parameters:
        entropy_coef (`float`, *optional*, defaults to `0.001`):
            lambda: weight of the multi-turn entropy bonus (TRL's built-in bonus) and of the smoothing term.
        smoothing (`bool`, *optional*, defaults to `True`):
            Enable the entropy smoothing regulariser. `False` gives "EPO-Base" (entropy bonus only).
        smoothing_coef (`float`, *optional*, defaults to `0.1`):
            c: smoothing coefficient x out-of-range penalty of the released runs (1.0 x 0.1 for GRPO).
        smoothing_kappa_low (`float`, *optional*, defaults to `0.0`):
            Lower band factor: tokens with entropy below `kappa_low * H_ref[turn]` are penalised (0 = off).
        smoothing_kappa_high (`float`, *optional*, defaults to `2.0`):
            Upper band factor: tokens with entropy above `kappa_high * H_ref[turn]` are penalised.
        entropy_history_window (`int` or `None`, *optional*, defaults to `None`):
            Reference = mean of a turn's last `entropy_history_window` step means; `None` = cumulative mean.
        smoothing_start_turn (`int`, *optional*, defaults to `0`):
            Only turns with index >= this are smoothed (the released code effectively used 25).
        entropy_schedule (`str`, *optional*, defaults to `"phase"`):
            `"phase"`: EPO's two-phase beta_k; `"constant"`: beta_k = 1.
        schedule_gamma (`float`, *optional*, defaults to `3.0`):
            Decay rate of the second phase of the schedule.
        schedule_horizon (`int` or `None`, *optional*, defaults to `None`):
            K, the schedule's length in optimizer steps; `None` = the run's total steps (`max_steps`).
    """

    entropy_coef: float = field(
        default=0.001,
        metadata={"help": "lambda: weight of the multi-turn entropy bonus (TRL's bonus) and of the smoothing term."},
    )
    smoothing: bool = field(
        default=True,
        metadata={"help": "Enable EPO's entropy smoothing regulariser. False gives EPO-Base (entropy bonus only)."},
    )
    smoothing_coef: float = field(
        default=0.1,
        metadata={"help": "c: smoothing coefficient x out-of-range penalty (released GRPO runs: 1.0 x 0.1). >= 0."},
    )
    smoothing_kappa_low: float = field(
        default=0.0,
        metadata={"help": "Lower band factor kappa_low (>= 0): entropy below kappa_low * H_ref[turn] is penalised."},
    )
    smoothing_kappa_high: float = field(
        default=2.0,
        metadata={
            "help": "Upper band factor kappa_high (>= kappa_low): entropy above kappa_high * H_ref is penalised."
        },
    )
    entropy_history_window: int | None = field(
        default=None,
        metadata={"help": "Reference = mean of a turn's last W step means (W >= 1); None = cumulative mean."},
    )
    smoothing_start_turn: int = field(
        default=0,
        metadata={"help": "Only turns with index >= this are smoothed (>= 0; the released code effectively used 25)."},
    )
    entropy_schedule: str = field(
        default="phase",
        metadata={"help": "Weight schedule beta_k of the smoothing term.", "choices": list(SCHEDULES)},
    )
    schedule_gamma: float = field(
        default=3.0,
        metadata={"help": "Decay rate gamma (>= 0) of the phase schedule's second half."},
    )
    schedule_horizon: int | None = field(
        default=None,
        metadata={"help": "Schedule length K in optimizer steps (>= 1); None = the run's total steps."},
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.smoothing_coef >= 0, "smoothing_coef", self.smoothing_coef, ">= 0")
        check(self.smoothing_kappa_low >= 0, "smoothing_kappa_low", self.smoothing_kappa_low, ">= 0")
        check(
            self.smoothing_kappa_high >= self.smoothing_kappa_low,
            "smoothing_kappa_high",
            self.smoothing_kappa_high,
            f">= smoothing_kappa_low ({self.smoothing_kappa_low})",
        )
        check(
            self.entropy_history_window is None or self.entropy_history_window >= 1,
            "entropy_history_window",
            self.entropy_history_window,
            "None (cumulative mean) or an integer >= 1",
        )
        check(self.smoothing_start_turn >= 0, "smoothing_start_turn", self.smoothing_start_turn, ">= 0")
        check(self.entropy_schedule in SCHEDULES, "entropy_schedule", self.entropy_schedule, f"one of {SCHEDULES}")
        check(self.schedule_gamma >= 0, "schedule_gamma", self.schedule_gamma, ">= 0")
        check(
            self.schedule_horizon is None or self.schedule_horizon >= 1,
            "schedule_horizon",
            self.schedule_horizon,
            "None (the run's total steps) or an integer >= 1",
        )
