"""KV reuse across turns for HF generation: trajectory mode without re-prefilling the conversation every turn.

In trajectory mode each turn's prompt is the previous turn's prompt + its completion + the observation, so
`HFBackend` prefills O(turns^2) tokens per episode. `KVCacheHFBackend` keeps, per row, the keys/values of the
tokens already processed and lets `generate` prefill only what is new.

Exactness: the backend builds exactly `HFBackend`'s left-padded `input_ids` and `attention_mask` (so position
ids, logits processors and the sampling RNG see the same thing) and hands `generate` a cache holding their first
`width - S` columns, S = the longest new suffix in the batch. A row whose new suffix is shorter re-feeds a few of
its cached tokens, so rows have no holes and no special masks. Cached keys/values come from earlier forwards with
the same weights, so they equal a full prefill up to float rounding: the same samples for the same seed and
logprobs equal to ~1e-6 in float32 (tests/test_kv_cache.py).

Matching: each new prompt is paired, in order, with the first remaining row of the previous call that it extends
(or that extends it: lockstep dummy prompts repeat a first prompt). A prompt that matches nothing is prefilled in
full; when no prompt of a call matches (a new rollout, step mode) the call is plain `HFBackend` generation.

Validity: a cache is only as good as the weights that built it. It is dropped whenever `weights_version()`
changes (`from_trainer`: the trainer's global step, so it never outlives an optimizer step, ZeRO-3 included);
without a trainer, call `reset()` after changing the weights. Only plain full-attention `DynamicCache` layers are
kept (sliding-window or other cache types: no reuse, same results).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .hf import HFBackend


@dataclass
class _Block:
    """The cache of one generate call: per layer (keys, values), each (batch, kv heads, columns, head dim)."""

    layers: list
    users: int = 0  # rows of the current call that still have to copy from it


@dataclass
class _Row:
    ids: list[int]  # tokens whose keys/values the row holds, in order
    block: _Block
    index: int  # batch index in the block
    start: int  # column of ids[0]; the ids occupy consecutive columns


class KVCacheHFBackend(HFBackend):
    """`HFBackend` that reuses each row's keys/values from the previous call when its prompt continues it.

    Same interface and samples as `HFBackend`; `reused_tokens` / `prefill_tokens` count prompt tokens taken from
    the cache / run through the model. `weights_version`: a callable whose value changes when the weights do.
    """

    def __init__(self, *args, weights_version: Callable[[], Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights_version = weights_version
        self.reused_tokens = self.prefill_tokens = 0
        self._rows: list[_Row] = []
        self._version: Any = None
        self._pending = iter(())

    @classmethod
    def from_trainer(cls, trainer, **overrides) -> KVCacheHFBackend:
        overrides.setdefault("weights_version", lambda: getattr(getattr(trainer, "state", None), "global_step", None))
        return super().from_trainer(trainer, **overrides)

    def reset(self) -> None:
        """Forget every cached row (call after changing the weights, or to free the memory)."""
        self._rows = []

    def generate(self, prompts, max_new_tokens, temperature=None):
        version = self.weights_version() if self.weights_version is not None else None
        if version != self._version:
            self._rows, self._version = [], version
        prompts = [list(p) for p in prompts]
        matches = _match(prompts, self._rows)
        self._rows = []  # unmatched rows are freed before generating
        for row in matches:
            if row is not None:
                row.block.users = 0
        for row in matches:
            if row is not None:
                row.block.users += 1
        self._pending = iter(matches)  # consumed chunk by chunk in `_generate_batch`
        del matches
        try:
            return super().generate(prompts, max_new_tokens, temperature)
        except BaseException:
            self._rows = []
            raise
        finally:
            self._pending = iter(())

    def _generate_batch(self, model, prompts, max_new_tokens, temperature):
        matches = [next(self._pending) for _ in prompts]
        input_ids, attention_mask = self._left_padded(model, prompts)
        width = input_ids.size(1)
        # Each row must feed at least its last prompt token (its logits start the completion).
        reusable = [min(len(r.ids), len(p) - 1) if r is not None else 0 for r, p in zip(matches, prompts)]
        suffix = max(len(p) - n for p, n in zip(prompts, reusable))
        cache_kwargs = {}
        if suffix < width:
            cache_kwargs[_cache_kwarg(model)] = self._assemble(model, matches, prompts, width - suffix)
        self.reused_tokens += sum(max(len(p) - suffix, 0) for p in prompts)
        self.prefill_tokens += sum(min(len(p), suffix) for p in prompts)
        del matches
        out, ids, lps = self._sample(
            model, input_ids, attention_mask, max_new_tokens, temperature, return_dict_in_generate=True, **cache_kwargs
        )
        self._keep(getattr(out, "cache", None) or getattr(out, "past_key_values", None), prompts, ids, width)
        return ids, lps

    def _assemble(self, model, matches, prompts, columns: int):
        """A cache of `columns` columns: row i's first `len(p_i) - suffix` tokens, right-aligned (left columns are
        padding, masked out by the attention mask exactly as in a full prefill)."""
        import torch
        from transformers import DynamicCache

        suffix = max(len(p) for p in prompts) - columns
        groups: dict[int, tuple[_Block, list[int], list[int], list[int], list[int]]] = {}
        for i, (row, p) in enumerate(zip(matches, prompts)):
            take = len(p) - suffix
            if row is None or take <= 0:
                continue
            block, pos, index, start, count = groups.setdefault(id(row.block), (row.block, [], [], [], []))
            pos.append(i)
            index.append(row.index)
            start.append(row.start)
            count.append(take)
        device = next(iter(groups.values()))[0].layers[0][0].device
        arange = torch.arange(columns, device=device)
        plans = []
        for block, pos, index, start, count in groups.values():
            start_t = torch.tensor(start, device=device)[:, None]
            # column j of the new cache <- column start + j - (columns - take); padding columns clamp to `start`
            shift = columns - torch.tensor(count, device=device)[:, None]
            cols = torch.maximum(arange[None] + start_t - shift, start_t)
            block.users -= len(pos)
            plans.append((block, torch.tensor(pos, device=device), torch.tensor(index, device=device)[:, None], cols))
        layers = []
        for layer in range(len(plans[0][0].layers)):
            keys = values = None
            for block, pos, index, cols in plans:
                k, v = block.layers[layer]
                if keys is None:
                    keys = k.new_zeros((len(prompts), k.shape[1], columns, k.shape[3]))
                    values = v.new_zeros((len(prompts), v.shape[1], columns, v.shape[3]))
                # advanced indices around a slice put their dims first: (rows, columns, heads, dim)
                keys[pos] = k[index, :, cols].transpose(1, 2)
                values[pos] = v[index, :, cols].transpose(1, 2)
                if block.users == 0:  # no later chunk needs this layer of the old block: free it now
                    block.layers[layer] = None
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=getattr(model, "config", None))

    def _keep(self, cache, prompts, completions, width: int) -> None:
        """Remember each row's processed tokens: its prompt and the completion tokens fed back (never the last)."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return
        block = _Block([(layer.keys, layer.values) for layer in cache.layers])
        if any(k is None for k, _ in block.layers):
            return
        fed = block.layers[0][0].shape[-2] - width  # generated tokens in the cache
        if fed < 0:
            return
        for i, (p, c) in enumerate(zip(prompts, completions)):
            self._rows.append(_Row(p + c[: min(len(c), fed)], block, i, width - len(p)))


def _match(prompts: list[list[int]], rows: list[_Row]) -> list[_Row | None]:
    """Pair each prompt, in order, with the first remaining row that it extends or that extends it."""
    out: list[_Row | None] = []
    cursor = 0
    for p in prompts:
        found = None
        for k in range(cursor, len(rows)):
            ids = rows[k].ids
            n = min(len(ids), len(p))
            if n and ids[n - 1] == p[n - 1] and ids[:n] == p[:n]:  # the last-token test rejects most rows cheaply
                found, cursor = rows[k], k + 1
                break
        out.append(found)
    return out


def _cache_kwarg(model) -> str:
    """transformers renamed generate's `past_key_values` to `cache` (5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
