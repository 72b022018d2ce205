"""MultiTurnGRPOConfig: GRPOConfig plus the fields of the multi-turn machinery every method shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig


def check(ok: bool, name: str, value, allowed: str) -> None:
    """The one shape of a config error: the field, its value, and what is allowed."""
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}: must be {allowed}.")


@dataclass
class MultiTurnGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`MultiTurnGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter, plus the multi-turn
    machinery's. It is plain GRPO (the `--algo grpo` baseline); [`EPOConfig`] and [`AEPOConfig`] extend it.

    Parameters:
        > Step-mode batches

        max_rows_per_backward (`int` or `None`, *optional*, defaults to `None`):
            Memory bound for step-mode batches, whose row count (episodes x turns) varies: a micro-batch with more
            rows runs as several forward/backward passes of at most this many rows, with the loss weighted so the
            gradient equals the single pass. `None` = `per_device_train_batch_size`; `0` = never split.
        gigpo_omega (`float`, *optional*, defaults to `0.0`):
            Step mode: weight omega of GiGPO's anchor-state step advantage added to each turn's episode advantage
            (arXiv 2505.10978; the paper uses 1.0). `0` = plain GRPO.

        > vLLM

        skip_on_policy_old_logps (`bool`, *optional*, defaults to `True`):
            With vLLM's importance-sampling correction (`vllm_importance_sampling_correction`), TRL runs an extra
            no-grad forward over every row for the old log-probs. When the batch is on-policy (`num_iterations=1`
            and `gradient_accumulation_steps` a multiple of `steps_per_generation`) those are the training forward's
            detached log-probs: compute the IS ratios and TRL's `sampling/*` metrics from them and skip the pass.
            Same loss, gradients and metrics. `False` = TRL's path; off-policy batches always run the pass.
        vllm_server_base_urls (`list[str]` or `None`, *optional*, defaults to `None`):
            Server mode with several `trl vllm-serve` servers: each generate call's prompts are split across them
            (data-parallel generation) and every weight sync reaches all of them.
        vllm_sync_check (`bool`, *optional*, defaults to `True`):
            After every weight push, sample a short probe from the engine and compare its log-probs with the
            trainer's; raise `StaleEngineError` above `vllm_sync_tolerance`.
        vllm_sync_tolerance (`float` or `None`, *optional*, defaults to `None`):
            Largest accepted mean |log-prob difference| (nats) between vLLM and the trainer on the probe; `None` =
            by the trainer's precision: 0.1 in fp32, 0.25 with `bf16` / `fp16` (half-precision rounding alone
            reads ~0.1 on the probe; docs/scaling.md has the measured table).
    """

    max_rows_per_backward: int | None = field(
        default=None,
        metadata={
            "help": "Step mode: split micro-batches with more rows into forward/backward passes of at most this many "
            "rows (same gradient, bounded memory). None = per_device_train_batch_size; 0 = never split."
        },
    )
    gigpo_omega: float = field(
        default=0.0,
        metadata={
            "help": "Step mode: weight omega (>= 0) of GiGPO's anchor-state step advantage added to the episode's GRPO "
            "advantage (arXiv 2505.10978; paper: 1.0). 0 = plain GRPO."
        },
    )
    skip_on_policy_old_logps: bool = field(
        default=True,
        metadata={
            "help": "With vLLM's importance-sampling correction, compute the IS ratios of an on-policy batch "
            "(num_iterations=1, gradient_accumulation_steps a multiple of steps_per_generation) from the training "
            "forward's detached log-probs instead of TRL's extra no-grad forward over every row: same loss, "
            "gradients and sampling/* metrics, one forward less. False = TRL's path. Off-policy batches always run it."
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
    vllm_sync_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Largest accepted mean |log-prob difference| (nats) between vLLM and the trainer on the probe "
            "(> 0). Default: 0.1 in fp32, 0.25 with bf16/fp16, whose rounding alone reads ~0.1 (docs/scaling.md)."
        },
    )

    def __post_init__(self):
        if self.vllm_server_base_urls:
            urls = list(self.vllm_server_base_urls)
            check(len(set(urls)) == len(urls), "vllm_server_base_urls", urls, "distinct URLs")
            check(
                self.vllm_mode == "server",
                "vllm_server_base_urls",
                urls,
                "used with vllm_mode='server' (colocate mode runs one engine per rank)",
            )
            self.vllm_server_base_url = urls[0]  # TRL connects the first; the trainer adds the others
        super().__post_init__()
        # TRL accepts these and fails later (or never): every action invalid at a negative temperature, a torch
        # error after the model is built for a negative learning rate.
        check(self.temperature > 0, "temperature", self.temperature, "> 0 (the sampling temperature)")
        check(0 <= self.learning_rate < math.inf, "learning_rate", self.learning_rate, ">= 0 and finite")
        check(self.save_steps > 0, "save_steps", self.save_steps, "> 0 (steps, or a fraction of the run if < 1)")
        check(self.logging_steps > 0, "logging_steps", self.logging_steps, "> 0")
        check(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, ">= 0 (use 0 to disable the bonus)")
        check(self.gigpo_omega >= 0, "gigpo_omega", self.gigpo_omega, ">= 0 (0 = plain GRPO advantages)")
        if self.vllm_sync_tolerance is not None:
            check(self.vllm_sync_tolerance > 0, "vllm_sync_tolerance", self.vllm_sync_tolerance, "> 0")
        check(
            self.max_rows_per_backward is None or self.max_rows_per_backward >= 0,
            "max_rows_per_backward",
            self.max_rows_per_backward,
            "None (per_device_train_batch_size), 0 (never split) or an integer >= 1",
        )
