"""EPOConfig: GRPOConfig plus the fields of EPO's entropy control (docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

SCHEDULES = ("phase", "constant")


@dataclass
class EPOConfig(GRPOConfig):
    r"""
    Configuration class for [`EPOTrainer`]: every [`~trl.GRPOConfig`] parameter, plus EPO's.

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
        max_rows_per_backward (`int` or `None`, *optional*, defaults to `None`):
            Memory bound for step-mode batches, whose row count (episodes x turns) varies: a micro-batch with more
            rows runs as several forward/backward passes of at most this many rows, with the loss weighted so the
            gradient equals the single pass. `None` = `per_device_train_batch_size`; `0` = never split.
        vllm_server_base_urls (`list[str]` or `None`, *optional*, defaults to `None`):
            Server mode with several `trl vllm-serve` servers: each generate call's prompts are split across them
            (data-parallel generation) and every weight sync reaches all of them.
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

    max_rows_per_backward: int | None = field(
        default=None,
        metadata={
            "help": "Step mode: split micro-batches with more rows into forward/backward passes of at most this many "
            "rows (same gradient, bounded memory). None = per_device_train_batch_size; 0 = never split."
        },
    )

    vllm_server_base_urls: list[str] | None = field(
        default=None,
        metadata={
            "help": "Server mode: base URLs of several `trl vllm-serve` servers (data-parallel generation). Each "
            "generate call's prompts are split across them and every weight sync reaches all of them. Overrides "
            "vllm_server_base_url / vllm_server_host."
        },
    )

    vllm_sync_check: bool = field(
        default=True,
        metadata={
            "help": "After every weight push to vLLM, sample a short probe completion from the engine and compare its "
            "log-probs with the trainer's; raise StaleEngineError above vllm_sync_tolerance (a sync that did not "
            "take). Costs one 8-token generate and forward per step."
        },
    )
    vllm_sync_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "Largest accepted mean |log-prob difference| (nats) between vLLM and the trainer on the probe "
            "(> 0). fp32 on CPU measures ~1e-3, bf16 ~1e-2; a stale engine is off by 0.1-1 within a few steps."
        },
    )

    def __post_init__(self):
        if self.vllm_server_base_urls:
            urls = list(self.vllm_server_base_urls)
            _check(len(set(urls)) == len(urls), "vllm_server_base_urls", urls, "distinct URLs")
            _check(
                self.vllm_mode == "server",
                "vllm_server_base_urls",
                urls,
                "used with vllm_mode='server' (colocate mode runs one engine per rank)",
            )
            self.vllm_server_base_url = urls[0]  # TRL connects the first; EPOTrainer adds the others
        super().__post_init__()
        # TRL accepts these and fails later (or never): every action invalid at a negative temperature, a torch
        # error after the model is built for a negative learning rate.
        _check(self.temperature > 0, "temperature", self.temperature, "> 0 (the sampling temperature)")
        _check(self.learning_rate >= 0, "learning_rate", self.learning_rate, ">= 0")
        _check(self.save_steps > 0, "save_steps", self.save_steps, "> 0 (steps, or a fraction of the run if < 1)")
        _check(self.logging_steps > 0, "logging_steps", self.logging_steps, "> 0")
        _check(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, ">= 0 (use 0 to disable EPO's bonus)")
        _check(self.smoothing_coef >= 0, "smoothing_coef", self.smoothing_coef, ">= 0")
        _check(self.smoothing_kappa_low >= 0, "smoothing_kappa_low", self.smoothing_kappa_low, ">= 0")
        _check(
            self.smoothing_kappa_high >= self.smoothing_kappa_low,
            "smoothing_kappa_high",
            self.smoothing_kappa_high,
            f">= smoothing_kappa_low ({self.smoothing_kappa_low})",
        )
        _check(
            self.entropy_history_window is None or self.entropy_history_window >= 1,
            "entropy_history_window",
            self.entropy_history_window,
            "None (cumulative mean) or an integer >= 1",
        )
        _check(self.smoothing_start_turn >= 0, "smoothing_start_turn", self.smoothing_start_turn, ">= 0")
        _check(self.entropy_schedule in SCHEDULES, "entropy_schedule", self.entropy_schedule, f"one of {SCHEDULES}")
        _check(self.schedule_gamma >= 0, "schedule_gamma", self.schedule_gamma, ">= 0")
        _check(
            self.schedule_horizon is None or self.schedule_horizon >= 1,
            "schedule_horizon",
            self.schedule_horizon,
            "None (the run's total steps) or an integer >= 1",
        )
        _check(self.vllm_sync_tolerance > 0, "vllm_sync_tolerance", self.vllm_sync_tolerance, "> 0")
        _check(
            self.max_rows_per_backward is None or self.max_rows_per_backward >= 0,
            "max_rows_per_backward",
            self.max_rows_per_backward,
            "None (per_device_train_batch_size), 0 (never split) or an integer >= 1",
        )


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}: must be {allowed}.")
