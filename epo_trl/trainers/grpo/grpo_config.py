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

        > Forward passes

        share_prompt_forward (`bool`, *optional*, defaults to `True`):
            Within each forward chunk, rows with the same prompt (a GRPO group's rows in trajectory mode, turn-0 rows
            in step mode) run it once: a pass over each distinct prompt keeps its keys/values, then one pass over
            every row's completion reads them (exact: same log-probs, entropies and gradients, to float rounding).
            Used for the policy, reference and old-logp passes; TRL's forward runs for multimodal rows, MoE aux
            losses, models with sliding-window or recurrent layers, and under reentrant gradient checkpointing.

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
            After every weight push, score a fixed probe text with the engine and with the trainer (in the engine's
            precision) and compare, and compare each layer's weights (fingerprints through the engine's own kernels,
            exact after a correct push); raise `StaleEngineError` when the probe's gap exceeds `vllm_sync_tolerance`
            times the gap right after the first push, or when a layer's weights differ.
        vllm_sync_tolerance (`float` or `None`, *optional*, defaults to `None`):
            Largest accepted ratio of the probe's mean |log-prob difference| (engine vs trainer) to the same gap
            right after the first push (that reference floored at 1e-3 nats and at 1% of the trainer's move since
            the previous push); `None` = 3.3 for every precision and model: measured, a correct push reads <= 1.1
            and a stale engine >= 10 where it is visible at all (docs/scaling.md).
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
    share_prompt_forward: bool = field(
        default=True,
        metadata={
            "help": "Rows of a forward chunk that share their prompt (a GRPO group in trajectory mode, turn-0 rows in "
            "step mode) run it once: a prefix pass over each distinct prompt, then every row's completion over its "
            "keys/values. Same log-probs, entropies and gradients. Falls back to TRL's forward for multimodal rows, "
            "MoE aux losses, sliding-window or recurrent layers, and reentrant gradient checkpointing. False = TRL's forward."
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
            "help": "After every weight push to vLLM, score a fixed probe text (~100 tokens) with the engine and the "
            "trainer and compare, and compare each layer's weights (fingerprints through the engine's own kernels); "
            "raise StaleEngineError when the gap grows past vllm_sync_tolerance times the gap right after the first "
            "push, or a layer's weights differ (a sync that did not take). Costs one engine prefill, one forward and "
            "one pass over the weights per step."
        },
    )
    vllm_sync_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Largest accepted ratio (> 0) of the probe's mean |log-prob difference| between vLLM and the "
            "trainer to that gap right after the first push (floored at 1e-3 nats and at 0.01 times the trainer's "
            "last move). Default: 3.3 for every precision; a correct push reads <= 1.1, a stale engine >= 10 where "
            "visible (docs/scaling.md)."
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
