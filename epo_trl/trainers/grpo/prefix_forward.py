"""Shared-prefix forwards: rows with the same prompt run it once (a GRPO group's G rows; step mode's turn-0 rows).

TRL scores a chunk of rows (prompt ++ completion, prompts left-padded, completions right-padded, K = logits_to_keep)
with one forward per row. When U < B rows of the chunk have distinct prompt parts (ids and attention mask of
`[:, :P]`, P = L - K), the same numbers come from two passes ("Prefix Grouper", arXiv 2506.05433):

    1. prefix pass: the backbone (no LM head) over the U unique prompts minus their last token, positions 0..P-2,
       keeping their keys/values (a DynamicCache);
    2. expand the cache to the rows: cache[r] = cache[u(r)] (`index_select`: in the backward, the gradients of the
       rows that share a prompt sum into it);
    3. suffix pass: TRL's fused-LM-head forward over [last prompt token ++ completion] (B, K + 1) with the full
       (B, L) attention mask, positions P-1..L-1: its K log-probs / entropies are those of the completion tokens.

Exact (to float rounding) because attention is causal: a prompt position's keys and values do not depend on what
follows it. The positions are what TRL's forward uses (it passes no position_ids, so each row's positions are
`arange(L)` over the padded row, which the model continues after the cache), and the mask is the one TRL's
forward sees. Fewer tokens: U * (P - 1) + B * (K + 1) instead of B * L, and on devices where TRL's fused head scores
every position (CPU), no LM head over the prompts.

Models it cannot be exact for fall back to TRL's forward (`unsupported`): multimodal and encoder-decoder models, and
models whose cache is not plain full-attention keys/values (sliding-window layers: Mistral, Gemma 2/3, Qwen2 with
`use_sliding_window`; recurrent or linear-attention layers) and, while training, reentrant gradient checkpointing
(it passes gradients only to a layer's positional inputs, not to the cache). Non-reentrant checkpointing (TRL's and
transformers' default) works: both caches here give the same states when a checkpointed layer reruns.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

# `_get_per_token_logps_and_entropies` arguments of multimodal rows (TRL 1.16): any of them set, TRL's forward runs.
MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def unsupported(model, reentrant_checkpointing: bool = False) -> str | None:
    """Why a shared-prefix forward of `model` (the transformers model TRL patched with its fused LM head) would not
    be exact, or None when it is. `reentrant_checkpointing`: the trainer's gradient checkpointing is reentrant."""
    config = model.config
    if config.get_text_config() is not config or config.is_encoder_decoder:
        return "not a text-only decoder"
    # The model's own cache for its config: plain DynamicLayers keep every position's keys/values.
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
        return "sliding-window or recurrent layers: their cache keeps part of the prompt, or a state, not its keys"
    if model.is_gradient_checkpointing and model.training and reentrant_checkpointing:
        return "reentrant gradient checkpointing: it passes no gradient to the shared prompt's keys/values"
    return None


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
    """(first, inverse) of the rows' prompt parts: `first[u]` the first row with unique prompt u, `inverse[r]` row r's
    prompt; None when no two rows share one or the prompt is under two tokens (nothing to share)."""
    rows, prompt_len = input_ids.size(0), input_ids.size(1) - logits_to_keep
    if prompt_len < 2 or rows < 2:
        return None
    prompts = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)], dim=1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if unique.size(0) == rows:
        return None
    order = torch.arange(rows, device=input_ids.device)
    first = torch.full((unique.size(0),), rows, device=input_ids.device).scatter_reduce(0, inverse, order, "amin")
    return first, inverse


def grouping_order(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor | None:
    """A permutation of the rows that puts rows with the same prompt next to each other (first appearance order kept
    within a prompt), so that chunks of consecutive rows share what they can; None when no two rows share one."""
    prompts = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if unique.size(0) == prompt_ids.size(0):
        return None
    return torch.sort(inverse, stable=True).indices


def processed_tokens(input_ids: torch.Tensor, groups, logits_to_keep: int) -> int:
    """Token positions a forward over these rows runs: B * L unshared, U * (P - 1) + B * (K + 1) shared."""
    if groups is None:
        return input_ids.numel()
    rows, length = input_ids.shape
    return groups[0].numel() * (length - logits_to_keep - 1) + rows * (logits_to_keep + 1)


class _StoreLayer(DynamicLayer):
    """The prefix pass's cache layer: keeps (replaces) the pass's keys/values. transformers' DynamicLayer appends, so a
    checkpointed layer's rerun in the backward (gradient checkpointing) would store its keys twice; this gives the
    same states however often the layer runs."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ReadLayer(DynamicLayer):
    """The suffix pass's cache layer: the rows' prompt keys/values before the pass's own, storing nothing (same
    states on a checkpointed rerun)."""

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextmanager
def _checkpointed_layers_keep_cache(backbone):
    """transformers' checkpointed layers drop the cache unless `_can_checkpoint_with_cache` (for caches their rerun
    reads, not extends): both caches here are such."""
    layers = [m for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    layers = [m for m in layers if m.gradient_checkpointing and not m._can_checkpoint_with_cache]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


def shared_forward(model, backbone, input_ids, attention_mask, logits_to_keep: int, groups, compute_entropy: bool):
    """(log-probs, entropies or None) of the completion tokens, (B, K) each, from one prefix pass per unique prompt
    (`groups` from `prompt_groups`) and a suffix pass over every row. `model` is what TRL's forward calls (its fused
    LM head; a DDP / DeepSpeed wrapper included), `backbone` the transformers base model under it."""
    first, inverse = groups
    prompt_len = input_ids.size(1) - logits_to_keep
    prefix = DynamicCache()
    prefix.layer_class_to_replicate = _StoreLayer  # one per layer, created as the layers run
    suffix_ids = input_ids[:, prompt_len - 1 :]
    labels = suffix_ids.masked_fill(attention_mask[:, prompt_len - 1 :] == 0, -100)
    labels[:, 0] = -100  # the last prompt token is input only, as in TRL's labels
    with _checkpointed_layers_keep_cache(backbone):
        backbone(
            input_ids=input_ids[first, : prompt_len - 1],
            attention_mask=attention_mask[first, : prompt_len - 1],
            past_key_values=prefix,
            use_cache=True,
        )
        suffix = DynamicCache()
        for layer in prefix.layers:
            rows = _ReadLayer()
            rows.lazy_initialization(layer.keys, layer.values)
            # rows -> their prompt's keys/values; in the backward, index_select sums the rows' gradients into it
            rows.keys, rows.values = layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse)
            suffix.layers.append(rows)
        outputs = model(
            input_ids=suffix_ids,
            attention_mask=attention_mask,
            past_key_values=suffix,
            labels=labels,
            fused_lm_head=True,
        )
    entropies = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
    return outputs.log_probs[:, -logits_to_keep:], entropies


def own_rows(input_ids: torch.Tensor):
    """`prompt_groups` of rows that each keep their own prompt: the two passes over them run what TRL's forward runs."""
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    return rows, rows


def per_token_logps(
    model, backbone, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, plain, agree=None
):
    """TRL's chunked `_get_per_token_logps_and_entropies` (text rows, no aux loss) with shared prompts: each chunk of
    `batch_size` rows runs `shared_forward` when some of its rows share a prompt, else `plain(ids, mask)` (TRL's
    forward of that chunk). Rows are chunked in `grouping_order` (a group's rows together), the outputs returned in
    the rows' order. `agree(ids, logits_to_keep, groups) -> groups` makes every rank take the same path per chunk (sharded
    parameters). Returns (log-probs, entropies or None, token positions run)."""
    batch_size = batch_size or input_ids.size(0)
    order = None
    if batch_size < input_ids.size(0):
        prompt_len = input_ids.size(1) - logits_to_keep
        order = grouping_order(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
        if order is not None:
            input_ids, attention_mask = input_ids[order], attention_mask[order]
    logps, entropies, tokens = [], [], 0
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        groups = prompt_groups(ids, mask, logits_to_keep)
        if agree is not None:
            groups = agree(ids, logits_to_keep, groups)
        tokens += processed_tokens(ids, groups, logits_to_keep)
        if groups is None:
            chunk = plain(ids, mask)
        else:
            chunk = shared_forward(model, backbone, ids, mask, logits_to_keep, groups, compute_entropy)
        logps.append(chunk[0])
        entropies.append(chunk[1])
    logps, entropies = torch.cat(logps), torch.cat(entropies) if compute_entropy else None
    if order is not None:
        back = torch.argsort(order)
        logps, entropies = logps[back], entropies[back] if compute_entropy else None
    return logps, entropies, tokens
