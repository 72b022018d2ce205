"""Step-mode training rows (the EPO paper's setup): one row per (episode, turn), built by the trainer.

    row (episode i, turn t):  prompt = turn t's rendered prompt (header, goal, step, last W pairs, observation,
                              admissible actions, format instruction); completion = the model's turn-t output
    advantage(row) = (R_i - mean_group(R)) / (std_group(R) + 1e-4)   -- the episode's, broadcast to its turns
                     + omega * GiGPO step advantage of (i, t)        -- opt-in, `gigpo_omega` (gigpo.py)
    turn_ids(row)  = t

This is GRPO's `_generate_and_score_completions` for rows TRL's one-row-per-prompt contract cannot carry: the
rollout (epo_trl.rollout.StepRollout) plays the episodes; here they become advantages, padded tensors, old /
reference log-probs, vLLM IS ratios and TRL's metrics.

Row-count traps handled here: TRL's `_prepare_inputs` shuffles the batch and splits it into
`steps_per_generation` equal chunks, DROPPING any remainder; and every rank must run the same number of
forward/backward passes. So rows are padded, on every rank, to the same multiple of `steps_per_generation`
(the max over ranks) with dummy rows: a copy of a real row with completion_mask 0 and advantage 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Keys of the batch `_compute_loss` may read; the first must be a (B, ...) tensor (TRL's shuffle/split look
# at the first non-None value to find the batch size).
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "turn_ids")


def episode_returns(rollout, episodes: list, device) -> torch.Tensor:
    """Each episode's return, the score of all its turn rows (NaN = failed episode: it is never scored)."""
    returns = [math.nan if e.failed else e.episode_return(rollout.config) for e in episodes]
    return torch.tensor(returns, dtype=torch.float32, device=device)


def episode_advantages(rollout, episodes: list, trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-episode advantages and the gathered returns of all ranks (NaN = failed episode)."""
    device = trainer.accelerator.device
    mode = "train" if trainer.model.training else "eval"
    group = trainer.num_generations if mode == "train" else trainer.num_generations_eval
    local = episode_returns(rollout, episodes, device)
    # GRPO groups may span ranks: normalise over the gathered batch, then keep this rank's slice.
    returns = trainer.accelerator.gather(local)
    if returns.numel() % group:
        raise ValueError(
            f"{returns.numel()} episodes cannot form groups of num_generations={group}; the generation batch "
            "must be a multiple of num_generations (TRL's RepeatSampler guarantees it for training)."
        )
    grouped = returns.view(-1, group)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    centered = grouped - mean
    scale = trainer.scale_rewards
    if scale == "group" and group > 1:
        centered = centered / (_nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    elif scale == "batch" and returns.numel() > 1:
        centered = centered / (_nanstd(returns.view(1, -1), dim=1) + 1e-4)
    advantages = torch.nan_to_num(centered.view(-1), nan=0.0)
    rank = trainer.accelerator.process_index
    return advantages[rank * len(episodes) : (rank + 1) * len(episodes)], returns


def turn_advantages(rollout, episodes: list, advantages: torch.Tensor, trainer) -> list[list[float]]:
    """Each turn's advantage: the episode's (GRPO), plus GiGPO's anchor-state step advantage when
    `trainer.args.gigpo_omega > 0` (gigpo.py). Step groups are formed from this rank's episodes: exact
    when every rank holds whole GRPO groups (per-device batch a multiple of num_generations)."""
    episode = advantages.tolist()
    omega = getattr(trainer.args, "gigpo_omega", 0.0)
    if omega <= 0:
        return [[a] * len(e.turns) for a, e in zip(episode, episodes)]
    from .gigpo import combine, step_advantages

    group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
    offset = trainer.accelerator.process_index * len(episodes)
    # Anchor state of turn t = the observation it acted on (history[t][0]); failed episodes join no group.
    states = [[] if e.failed else [obs for obs, _ in e.history[: len(e.turns)]] for e in episodes]
    states = [s + [object()] * (len(e.turns) - len(s)) if s else s for s, e in zip(states, episodes)]
    rewards = [[] if e.failed else rollout.turn_rewards(e) for e in episodes]
    steps = step_advantages([(offset + i) // group for i in range(len(episodes))], states, rewards)
    steps = [s or [0.0] * len(e.turns) for s, e in zip(steps, episodes)]
    return combine(episode, steps, omega)


def build_training_batch(rollout, inputs: list[dict], trainer) -> dict[str, Any]:
    """Play this rank's generation batch with `rollout` and return step-wise training rows as TRL-style tensors."""
    accelerator, device = trainer.accelerator, trainer.accelerator.device
    mode = "train" if trainer.model.training else "eval"
    result = rollout.play([x["prompt"] for x in inputs], trainer)
    advantages, returns = episode_advantages(rollout, result.episodes, trainer)
    per_turn = turn_advantages(rollout, result.episodes, advantages, trainer)

    rows = [
        (turn.prompt_ids, turn.completion_ids, turn.logprobs, adv, t)
        for e, advs in zip(result.episodes, per_turn)
        for t, (turn, adv) in enumerate(zip(e.turns, advs))
    ]
    num_real = len(rows)
    # Same row count on every rank, a multiple of steps_per_generation (see the module docstring).
    chunks = trainer.args.steps_per_generation if mode == "train" else 1
    target = max(_round_up(num_real, chunks), chunks)
    target = int(accelerator.gather(torch.tensor([target], device=device)).max().item())
    filler = rows[0] if rows else ([trainer.processing_class.pad_token_id], [], [], 0.0, 0)
    rows += [(filler[0], filler[1], [], 0.0, 0)] * (target - num_real)

    batch = _tensorize(rows, num_real, trainer)
    loss_mask = batch["completion_mask"]
    batch["num_items_in_batch"] = accelerator.gather(loss_mask.sum()).sum()
    _add_old_logps(batch, trainer)
    _log(trainer, mode, returns, batch, num_real)
    # TRL keeps the dict order: a (B, ...) tensor must come first.
    return {k: batch[k] for k in (*ROW_KEYS, *[k for k in batch if k not in ROW_KEYS])}


def _tensorize(rows: list[tuple], num_real: int, trainer) -> dict[str, Any]:
    from trl.trainer.utils import pad

    device = trainer.accelerator.device
    pad_id = trainer.processing_class.pad_token_id
    multiple = trainer.pad_to_multiple_of
    eos_ids = set(trainer.eos_token_ids)  # TRL's: the tokenizer's EOS and every one the model declares
    prompts = [torch.tensor(r[0], dtype=torch.long) for r in rows]
    # A row needs at least one completion position (a dummy row may have none).
    completions = [torch.tensor(r[1] or [pad_id], dtype=torch.long) for r in rows]
    masks = []
    for i, (r, ids) in enumerate(zip(rows, completions)):
        mask = torch.ones_like(ids) if i < num_real and r[1] else torch.zeros_like(ids)
        truncated = not r[1] or r[1][-1] not in eos_ids
        if trainer.mask_truncated_completions and truncated:
            mask = torch.zeros_like(ids)
        masks.append(mask)
    batch: dict[str, Any] = {
        "prompt_ids": pad(prompts, pad_id, "left", multiple).to(device),
        "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, "left", multiple).to(device),
        "completion_ids": pad(completions, pad_id, "right", multiple).to(device),
        "completion_mask": pad(masks, 0, "right", multiple).to(device),
        "advantages": torch.tensor([r[3] for r in rows], dtype=torch.float32, device=device),
        "turn_ids": torch.tensor([r[4] for r in rows], dtype=torch.long, device=device),
    }
    if trainer.use_vllm:
        logps = [
            torch.tensor((r[2] + [0.0] * len(c))[: len(c)], dtype=torch.float32) for r, c in zip(rows, completions)
        ]
        batch["sampling_per_token_logps"] = pad(logps, 0.0, "right", multiple).to(device)
    return batch


def _add_old_logps(batch: dict[str, Any], trainer) -> None:
    """old_per_token_logps when samples are reused or off-policy (TRL's condition), and vLLM IS ratios.

    When the batch is on-policy (`trainer.is_from_training_forward()`), the old log-probs ARE the training forward's
    detached ones: the extra no-grad pass is skipped and the IS ratios and their metrics are computed from the
    training forward (`MultiTurnGRPOTrainer._get_per_token_logps_and_entropies`)."""
    args = trainer.args
    generate_every = args.steps_per_generation * trainer.num_iterations
    use_is = trainer.use_vllm and trainer.vllm_importance_sampling_correction
    deferred = use_is and trainer.is_from_training_forward()
    if deferred:
        trainer.defer_sampling_stats(batch["completion_ids"].size(0), real_rows_only=True)
    need_old = args.gradient_accumulation_steps % generate_every != 0 or (use_is and not deferred)
    if not need_old and trainer.beta == 0.0:
        return
    from trl.models.utils import disable_gradient_checkpointing

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    mode = "train" if trainer.model.training else "eval"
    size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
        if need_old:
            batch["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, keep, batch_size=size
            )[0]
        if trainer.beta != 0.0:
            batch["ref_per_token_logps"] = _ref_logps(trainer, ids, attention, keep, size)
    if use_is and not deferred:
        mask = batch["completion_mask"]
        old, sampling = batch["old_per_token_logps"], batch["sampling_per_token_logps"]
        batch["importance_sampling_ratio"] = importance_ratio(old, sampling, mask, trainer)
        stats = SamplingStats(batch["completion_ids"].size(0), real_rows_only=True)
        stats.add(old, sampling, batch["importance_sampling_ratio"], mask, trainer)
        stats.flush(trainer, mode)


def _ref_logps(trainer, ids, attention, keep, size):
    if trainer.ref_model is not None:
        return trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attention, keep, size)[0]
    from trl.trainer.utils import use_adapter

    model = trainer.accelerator.unwrap_model(trainer.model)
    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, keep, size)[0]


def _log(trainer, mode, returns, batch, num_real) -> None:
    metrics = trainer._metrics[mode]
    valid = returns[~torch.isnan(returns)]
    group = trainer.num_generations if mode == "train" else trainer.num_generations_eval
    grouped = returns.view(-1, group)
    metrics["reward"].append(valid.mean().item() if valid.numel() else 0.0)
    metrics["reward_std"].append(_nanstd(returns.view(1, -1), dim=1).item() if valid.numel() > 1 else 0.0)
    zero_std = torch.isclose(_nanstd(grouped, dim=1).nan_to_num(0.0), torch.zeros(1, device=grouped.device))
    metrics["frac_reward_zero_std"].append(zero_std.float().mean().item())
    acc = trainer.accelerator
    device = acc.device
    lengths = batch["completion_mask"][:num_real].sum(1).float()
    gathered = acc.gather(torch.tensor([lengths.sum().item(), float(num_real)], device=device).view(1, 2)).sum(0)
    metrics["completions/mean_length"].append((gathered[0] / gathered[1].clamp(min=1)).item())
    metrics["rollout/rows"].append(gathered[1].item())
    if mode == "train":
        tokens = batch["prompt_mask"][:num_real].sum() + batch["completion_mask"][:num_real].sum()
        trainer.state.num_input_tokens_seen += int(acc.gather(tokens.view(1)).sum().item())
    metrics["num_tokens"] = [trainer.state.num_input_tokens_seen]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    from trl.trainer.utils import nanstd

    return nanstd(x, dim=dim)


SAMPLING_METRICS = (
    "sampling/sampling_logp_difference/mean",
    "sampling/sampling_logp_difference/max",
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
)


class SamplingStats:
    """TRL's `sampling/*` metrics of one generation batch (GRPOTrainer._generate_and_score_completions, TRL 1.16):
    |trainer - vLLM| log-prob difference over action tokens, and the IS ratio's min / mean / max.

    Accumulated over the passes that score the batch's rows (the whole batch at once on TRL's path; the training
    forward's micro-batches and row chunks when the old-logp pass is skipped) and logged once, when all `rows` are
    in, with TRL's reductions: this rank's mean / max / min over its tokens, then mean / max / min over ranks.
    Sequence-level ratios count one per row: every row (TRL's trajectory rows) or, with `real_rows_only`, the rows
    with an action token (step mode's dummy rows are out)."""

    def __init__(self, rows: int, real_rows_only: bool):
        self.rows_left, self.real_rows_only = rows, real_rows_only
        self.delta_sum, self.delta_count, self.delta_max = 0.0, 0, -math.inf
        self.ratio_sum, self.ratio_count, self.ratio_min, self.ratio_max = 0.0, 0, math.inf, -math.inf

    def add(self, old, sampling, ratio, mask, trainer) -> None:
        mask = mask.bool()
        delta = torch.abs(old - sampling)
        delta = delta[mask & ~torch.isnan(delta)]  # vLLM could not score NaN tokens: out, as TRL does
        if trainer.vllm_importance_sampling_mode.startswith("sequence"):
            flat = ratio[mask.any(dim=1)].flatten() if self.real_rows_only else ratio.flatten()
        else:
            flat = ratio[mask]
        if delta.numel():
            self.delta_sum += delta.double().sum().item()
            self.delta_count += delta.numel()
            self.delta_max = max(self.delta_max, delta.max().item())
        if flat.numel():
            self.ratio_sum += flat.double().sum().item()
            self.ratio_count += flat.numel()
            self.ratio_min = min(self.ratio_min, flat.min().item())
            self.ratio_max = max(self.ratio_max, flat.max().item())
        self.rows_left -= ratio.size(0)

    def flush(self, trainer, mode: str) -> None:
        from trl.trainer.utils import nanmax, nanmin

        acc, device = trainer.accelerator, trainer.accelerator.device
        metrics = trainer._metrics[mode]

        def local(value: float, present: bool) -> torch.Tensor:  # TRL logs 0 for a rank with nothing to measure
            return torch.tensor(value if present else 0.0, dtype=torch.float32, device=device)

        some_delta, some_ratio = self.delta_count > 0, self.ratio_count > 0
        delta_mean = local(self.delta_sum / max(self.delta_count, 1), some_delta)
        metrics["sampling/sampling_logp_difference/mean"].append(acc.gather(delta_mean).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(
            acc.gather(local(self.delta_max, some_delta)).max().item()
        )
        metrics["sampling/importance_sampling_ratio/min"].append(
            nanmin(acc.gather(local(self.ratio_min, some_ratio))).item()
        )
        ratio_mean = local(self.ratio_sum / max(self.ratio_count, 1), some_ratio)
        metrics["sampling/importance_sampling_ratio/mean"].append(acc.gather(ratio_mean).nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(
            nanmax(acc.gather(local(self.ratio_max, some_ratio))).item()
        )


def importance_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, trainer) -> torch.Tensor:
    """TRL's vLLM importance-sampling correction (same four modes) of rows with trainer log-probs `old`, vLLM's
    `sampling` and the action-token `mask`: (B, T) for token modes, (B, 1) for sequence modes."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    mode = trainer.vllm_importance_sampling_mode
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    low, high = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=low, max=high)
    low = -math.inf if low is None else low
    high = math.inf if high is None else high
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
