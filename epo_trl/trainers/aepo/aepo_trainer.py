"""AEPOTrainer: target-entropy control by a REINFORCE term on temperature-shifted samples.

AEPO (arXiv 2510.08141), in our form (docs/method.md, "AEPO: target-entropy control"):

    L = L_TRL + aepo_coef * L_reg,   L_reg = - token-mean over kept samples of log pi_theta(o_j)

Kept samples are re-sampled at T = T_high when the last step's entropy H <= H*, else T_low, and kept when their
within-group advantage exceeds a threshold. The only changes w.r.t. MultiTurnGRPOTrainer: the re-sampling after each
generation step, `method_loss` (A4, A5) and the state it keeps across steps; the math lives in `aepo_math`.
"""

from __future__ import annotations

import copy

import torch
from trl.trainer.utils import pad

from ..grpo.grpo_trainer import ActionTokens, MultiTurnGRPOTrainer, arxiv_paper, float_or_none
from .aepo_config import AEPOConfig
from .aepo_math import (
    choose_temperature,
    group_advantages,
    reinforce_sum,
    rows_per_micro_batch,
    sampled_entropy_sums,
    select_kept,
    share_cap,
)


class AEPOTrainer(MultiTurnGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same constructor) that trains with AEPO.

    Every training generation step re-samples `aepo_resample_share` of the prompts `aepo_num_resamples` times at
    the temperature chosen from the last step's entropy, through TRL's own generation path (HF generate, vLLM,
    or the `rollout_func`, which then plays whole episodes at that temperature), scores them with the reward
    functions and keeps the above-mean ones. Their REINFORCE term is added on top of the normal batch, split
    over the micro-batches of each optimizer step so it counts exactly once per step.

    With TRL's `tools` / `environment_factory`, the re-samples run TRL's own tool-calling loop: each gets an
    environment instance of its own (reset with its dataset row), and its tool results are masked out of (A4).

    With a step-mode rollout (`StepRollout`, one row per turn), a re-sample is a whole episode played at that
    temperature and scored by its return; every turn of an above-mean episode is a kept sample (the caps count
    turn rows, the unit of the step-mode loss).

    Not supported: images.
    """

    _tag_names = ["trl", "grpo", "multi-turn", "aepo"]
    _name = "AEPO"
    _paper = arxiv_paper("aepo2025", "Arbitrary Entropy Policy Optimization", "2510.08141", 2025)
    config_class = AEPOConfig
    checkpoint_keys = ("aepo",)

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self._aepo_batch: dict | None = None  # kept rows of the latest generation batch
        self._aepo_active: dict | None = None  # the ones the current optimizer step trains on
        self._aepo_micro = 0  # micro-batch index inside the current optimizer step
        self._aepo_reg_sum = 0.0  # this rank's sum of -log pi over kept tokens during the current step
        self._aepo_sampled_sums: torch.Tensor | None = None
        # (A5) sampled estimator of the last optimizer step (all ranks, all micro-batches); only for "sampled".
        self.aepo_sampled_entropy: float | None = None

    # --- entropy and temperature ----------------------------------------------------------------------
    def aepo_entropy(self) -> float | None:
        """H of the last optimizer step under the configured estimator; None before the first step."""
        if self.args.aepo_entropy_estimator == "sampled":
            return self.aepo_sampled_entropy
        return self.last_step_entropy

    def aepo_temperature(self) -> float:
        """(A1) The regularisation samples' temperature for the next generation step."""
        a = self.args
        return choose_temperature(
            self.aepo_entropy(), a.aepo_target_entropy, a.aepo_temperature_high, a.aepo_temperature_low
        )

    # --- re-sampling ----------------------------------------------------------------------------------
    def on_generation(self, inputs: list[dict]) -> None:
        super().on_generation(inputs)
        if self.args.aepo_coef > 0:
            self._aepo_batch = self._aepo_regularisation_batch(inputs)

    def _aepo_regularisation_batch(self, inputs: list[dict]) -> dict:
        """Re-sample, score and select (A1-A3); return the kept rows, padded to the same count on every rank."""
        a, acc = self.args, self.accelerator
        device, rank, n = acc.device, acc.process_index, a.aepo_num_resamples
        entropy = self.aepo_entropy()
        temperature = self.aepo_temperature()
        above = entropy is not None and entropy > a.aepo_target_entropy

        # Whole groups: distinct dataset rows (not prompts: TRL environment rows share one prompt and differ in the
        # task column). Every rank re-samples the same number, so generation calls (vLLM server, ZeRO-3 gathers)
        # and the reward gather line up across ranks.
        seen: dict[str, int] = {}
        for i, x in enumerate(inputs):
            seen.setdefault(repr(sorted(x.items())), i)
        firsts = list(seen.values())
        fewest = int(acc.gather(torch.tensor([len(firsts)], device=device)).min().item())
        num_prompts = min(max(1, round(a.aepo_resample_share * fewest)), len(firsts))
        rng = torch.Generator().manual_seed(a.seed * 1_000_003 + self.state.global_step * 1009 + rank)
        chosen = sorted(torch.randperm(len(firsts), generator=rng)[:num_prompts].tolist())
        rows = [copy.copy(inputs[firsts[i]]) for i in chosen for _ in range(n)]
        extra = self.sample_more(rows, temperature, n)
        samples = extra.samples
        # (A2) within each group of n; a step-mode turn row carries its episode's advantage
        advantages = group_advantages(extra.rewards, n)[extra.unit]
        eligible = None
        if self.mask_truncated_completions:
            stop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            eligible = torch.tensor([bool(c) and c[-1] in stop for _, c, _ in samples], device=device)
        kept = select_kept(advantages, a.aepo_advantage_threshold, eligible)  # (A3)
        counts = acc.gather(torch.tensor([kept.numel()], device=device)).tolist()
        quota = share_cap(counts, a.aepo_max_kept_above_target if above else a.aepo_max_kept)
        kept = kept[: quota[rank]].tolist()  # in sampling order, like the released code's first rows

        self.log_metric("aepo/temperature", temperature)
        self.log_metric("aepo/candidates", float(sum(counts)))
        self.log_metric("aepo/kept", float(sum(quota)))
        if entropy is not None:
            self.log_metric("aepo/entropy", entropy)
            self.log_metric("aepo/entropy_minus_target", entropy - a.aepo_target_entropy)

        num_rows = max(quota)
        if num_rows == 0:
            return {"rows": 0}
        # Pad to the same row count on every rank (same forward/backward structure; ZeRO-3/FSDP-safe) with
        # weight-0 copies of a real row.
        select = kept + [kept[0] if kept else 0] * (num_rows - len(kept))
        weight = torch.tensor([1.0] * len(kept) + [0.0] * (num_rows - len(kept)), device=device)
        pad_id = self._tokenizer.pad_token_id
        prompts_t = [torch.tensor(samples[i][0]) for i in select]
        comps_t = [torch.tensor(samples[i][1]) for i in select]
        env = [
            torch.ones(len(samples[i][1])) if samples[i][2] is None else torch.tensor(samples[i][2]) for i in select
        ]
        completion_mask = pad([torch.ones_like(c) for c in comps_t], 0, "right").to(device)
        loss_mask = pad([e.float() for e in env], 0, "right").to(device) * completion_mask * weight[:, None]
        num_tokens = acc.gather(loss_mask.sum().reshape(1)).sum().item()
        return {
            "rows": num_rows,
            "prompt_ids": pad(prompts_t, pad_id, "left").to(device),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts_t], 0, "left").to(device),
            "completion_ids": pad(comps_t, pad_id, "right").to(device),
            "completion_mask": completion_mask,
            "loss_mask": loss_mask,
            "num_tokens": max(num_tokens, 1.0),  # global: the token mean of (A4) spans every rank
        }

    # --- loss -----------------------------------------------------------------------------------------
    def method_loss(self, model, inputs, tokens: ActionTokens):
        extra = super().method_loss(model, inputs, tokens)
        if not self.model.training or self.args.aepo_coef == 0:
            return extra
        if self.args.aepo_entropy_estimator == "sampled":
            sums = sampled_entropy_sums(tokens.logps, tokens.mask)  # (A5)
            self._aepo_sampled_sums = sums if self._aepo_sampled_sums is None else self._aepo_sampled_sums + sums
        if self._aepo_micro == 0:  # fixed for the whole optimizer step, even if a new generation batch arrives
            self._aepo_active = self._aepo_batch
        extra = extra + self._aepo_term(model, self._aepo_micro)
        self._aepo_micro += 1
        return extra

    def _aepo_term(self, model, micro: int):
        """(A4) alpha * this micro-batch's share of L_reg: its rows' -sum log pi over the GLOBAL token count.

        Gradients are summed over micro-batches and averaged over ranks (DDP), hence the world-size factor: the
        step's total gradient is exactly alpha * grad L_reg. Every rank has the same row count, so all run the
        same forwards. Log-probs come from TRL's policy forward: logits / args.temperature (1.0 by default).
        """
        batch = self._aepo_active
        if batch is None or batch["rows"] == 0:
            return 0.0
        per_micro = rows_per_micro_batch(batch["rows"], self.current_gradient_accumulation_steps)
        rows = slice(micro * per_micro, min((micro + 1) * per_micro, batch["rows"]))
        if rows.start >= rows.stop:
            return 0.0
        logps = self.policy_logps(
            model,
            batch["prompt_ids"][rows],
            batch["prompt_mask"][rows],
            batch["completion_ids"][rows],
            batch["completion_mask"][rows],
        )
        total = reinforce_sum(logps, batch["loss_mask"][rows])
        self._aepo_reg_sum = self._aepo_reg_sum + total.detach()
        return self.args.aepo_coef * total * self.accelerator.num_processes / batch["num_tokens"]

    def step_sums(self) -> dict[str, torch.Tensor]:
        """This rank's L_reg sum and sampled-entropy (sum, count) of the step, reduced with the base's."""
        sampled = self._aepo_sampled_sums
        device = self.accelerator.device
        sampled = torch.zeros(2, dtype=torch.float64) if sampled is None else sampled.detach().double()
        reg = torch.as_tensor(self._aepo_reg_sum, dtype=torch.float64)
        sampled, reg = sampled.to(device), reg.to(device)
        self._aepo_micro, self._aepo_reg_sum, self._aepo_sampled_sums = 0, 0.0, None
        return {
            **super().step_sums(),
            "aepo/reg_sum": reg,
            "aepo/sampled_entropy_sum": sampled[0],
            "aepo/sampled_tokens": sampled[1],
        }

    def on_step_end(self, turn_means: dict[int, float], sums: dict[str, torch.Tensor]) -> None:
        super().on_step_end(turn_means, sums)
        reg_total, h_sum, h_count = (
            float(sums[key]) for key in ("aepo/reg_sum", "aepo/sampled_entropy_sum", "aepo/sampled_tokens")
        )
        batch = self._aepo_active
        if batch is not None and self.args.aepo_coef > 0:
            self.log_metric("aepo/reg_loss", reg_total / batch["num_tokens"] if batch["rows"] else 0.0)
        if h_count > 0:
            self.aepo_sampled_entropy = h_sum / h_count

    # --- checkpointing --------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        return {**super().state_for_checkpoint(), "aepo": {"sampled_entropy": self.aepo_sampled_entropy}}

    def load_checkpoint_state(self, state: dict) -> None:
        if "aepo" not in state:
            raise ValueError(
                "This checkpoint's epo_state.json has no 'aepo' entry: it was not written by AEPOTrainer, so the "
                "entropy AEPO's temperature choice depends on is missing. Resume from an AEPOTrainer checkpoint."
            )
        super().load_checkpoint_state(state)
        self.aepo_sampled_entropy = float_or_none(state["aepo"]["sampled_entropy"])
