"""Generation backends behind one small interface, plus the cross-rank lockstep they may need.

    backend.generate(prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None)
        -> Generation(completion_ids: list[list[int]], logprobs: list[list[float]] | None)

`completion_ids` holds the sampled tokens up to and including the first EOS (no padding). `logprobs` are the
sampled tokens' log-probabilities under the temperature-scaled policy (the quantity TRL's importance sampling
compares with). `backend.lockstep` says whether every rank must make the same calls with the same number of
prompts (vLLM server mode, colocate tensor parallelism or sleep mode over sharded weights; sharded HF models), in
which case the rollout engine pads and synchronises turns. `backend.eos_ids` are the ids that end a turn: the
trainer's `eos_token_ids` (tokenizer EOS + the generation config's), the one source of truth for cutting and for
deciding whether a turn was truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class Generation:
    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    lockstep: bool
    eos_ids: list[int] | None

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None
    ) -> Generation: ...


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a completion, as TRL's GRPOTrainer computes `eos_token_ids`: the tokenizer's EOS first, then
    every EOS the model's generation config declares (e.g. Qwen2.5-Instruct's end-of-turn and end-of-text)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    eos = tokenizer.eos_token_id
    return declared if eos is None or eos in declared else [eos, *declared]


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS (TRL masks everything after it)."""
    out = []
    for token in ids:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


_PER_CALL_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "pad_token_id", "bos_token_id"}


class _LogitsRecorder:
    """A logits processor that records the log-probability of each sampled token without keeping all scores.

    `generate(output_scores=True)` would hold (batch x steps x vocab) floats; this keeps one step at a time.
    Custom processors run before the sampling warpers, so the temperature is applied here (top-k/top-p are not:
    the recorded value is the temperature-scaled full-vocabulary log-probability, as TRL's trainer computes it).
    """

    def __init__(self, temperature: float, prompt_len: int):
        self.temperature, self.prompt_len = temperature, prompt_len
        self.pending = None  # log-softmax of the last step, waiting for its sampled token
        self.logprobs: list = []

    def __call__(self, input_ids, scores):
        import torch

        self._flush(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / max(self.temperature, 1e-5), dim=-1)
        return scores

    def _flush(self, tokens) -> None:
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(1, tokens.view(-1, 1)).squeeze(1))
            self.pending = None

    def finish(self, sequences):
        import torch

        if self.pending is not None:
            self._flush(sequences[:, -1])
        return torch.stack(self.logprobs, dim=1) if self.logprobs else sequences.new_zeros((len(sequences), 0)).float()


class HFBackend:
    """Batched `model.generate` with left padding: the CPU path, and evaluation without a trainer.

    Build it from a trainer with `HFBackend.from_trainer(trainer)`, or from a model and tokenizer.
    `batch_size` splits big turns into several `generate` calls (None = one call per turn).
    """

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        return_logprobs: bool = True,
        batch_size: int | None = None,
        accelerator=None,
        gather_deepspeed3_params: bool = True,
        generation_kwargs: dict[str, Any] | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("HFBackend needs a tokenizer with a pad token; set tokenizer.pad_token first.")
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.return_logprobs, self.batch_size = return_logprobs, batch_size
        self.accelerator, self.gather_deepspeed3_params = accelerator, gather_deepspeed3_params
        kwargs = dict(generation_kwargs or {})
        eos = kwargs.pop("eos_token_id", None) or eos_token_ids(tokenizer, _unwrap(model))
        # Keys this backend sets per call win over the trainer's generation kwargs.
        self.generation_kwargs = {k: v for k, v in kwargs.items() if k not in _PER_CALL_KEYS}
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        # Sharded models gather parameters collectively in every generate call: all ranks must call together.
        self.lockstep = bool(accelerator is not None and accelerator.num_processes > 1 and _is_sharded(accelerator))

    @classmethod
    def from_trainer(cls, trainer, **overrides) -> HFBackend:
        kwargs = getattr(trainer, "generation_kwargs", None) or {}
        options = dict(
            model=trainer.model_wrapped,
            tokenizer=trainer.processing_class,
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            top_k=trainer.top_k,
            accelerator=trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            generation_kwargs={**kwargs, "eos_token_id": trainer.eos_token_ids},
        )
        options.update(overrides)
        return cls(**options)

    def _unwrapped(self):
        if self.accelerator is None:
            return nullcontext(self.model)
        from trl.models import unwrap_model_for_generation

        return unwrap_model_for_generation(
            self.model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
        )

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None) -> Generation:
        import torch

        temperature = self.temperature if temperature is None else temperature
        step = self.batch_size or max(len(prompts), 1)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        with self._unwrapped() as model, torch.no_grad():
            for start in range(0, len(prompts), step):
                ids, lps = self._generate_batch(model, prompts[start : start + step], max_new_tokens, temperature)
                completions.extend(ids)
                logprobs.extend(lps)
        return Generation(completions, logprobs if self.return_logprobs else None)

    def _generate_batch(self, model, prompts, max_new_tokens, temperature):
        input_ids, attention_mask = self._left_padded(model, prompts)
        _, ids, lps = self._sample(model, input_ids, attention_mask, max_new_tokens, temperature)
        return ids, lps

    def _left_padded(self, model, prompts):
        """(input_ids, attention_mask) of the prompts, left-padded to the longest."""
        import torch

        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        return input_ids, attention_mask

    def _sample(self, model, input_ids, attention_mask, max_new_tokens, temperature, **generate_kwargs):
        """One `model.generate`; returns (its output, completion ids cut at EOS, their log-probabilities)."""
        from transformers import LogitsProcessorList

        width = input_ids.size(1)
        recorder = _LogitsRecorder(temperature, width)
        sampling = temperature > 0
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            top_k=self.top_k if sampling else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
            logits_processor=LogitsProcessorList([recorder]) if self.return_logprobs else None,
            **{**self.generation_kwargs, **generate_kwargs},
        )
        sequences = out.sequences if generate_kwargs.get("return_dict_in_generate") else out
        token_logps = recorder.finish(sequences) if self.return_logprobs else None
        ids, lps = [], []
        for row, tokens in enumerate(sequences[:, width:].tolist()):
            cut = cut_at_eos(tokens, self.eos_ids)
            ids.append(cut)
            lps.append(token_logps[row, : len(cut)].tolist() if token_logps is not None else [])
        return out, ids, lps


class VLLMBackend:
    """`trainer.vllm_generation.generate` (colocate or server mode), one completion per prompt.

    vLLM takes `max_tokens` from `vllm_generation.max_completion_length` and the temperature from
    `vllm_generation.temperature`; both are set for the call and restored after.

    `lockstep`: whether a generate call is a collective, so every rank must make the same calls with the same number
    of prompts (TRL 1.16 `VLLMGeneration.generate`): server mode gathers all ranks' prompts (TRL issue #6673);
    colocate with `tensor_parallel_size > 1` all-gathers prompts inside the TP group and slices by equal sizes; sleep
    mode re-syncs the weights on every wake, which gathers sharded (ZeRO-3 / FSDP) parameters collectively.
    """

    def __init__(self, vllm_generation, lockstep: bool, eos_ids: Sequence[int] = ()):
        self.vllm, self.eos_ids = vllm_generation, list(eos_ids)
        self.lockstep = lockstep

    @classmethod
    def from_trainer(cls, trainer) -> VLLMBackend:
        return cls(trainer.vllm_generation, vllm_is_collective(trainer), trainer.eos_token_ids)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None) -> Generation:
        saved = self.vllm.max_completion_length, self.vllm.temperature
        self.vllm.max_completion_length = max_new_tokens
        if temperature is not None:
            self.vllm.temperature = temperature
        try:
            _, completion_ids, logprobs, token_ids = self.vllm.generate(
                prompts=prompts, images=None, num_generations=1
            )
        finally:
            self.vllm.max_completion_length, self.vllm.temperature = saved
        ids = [cut_at_eos(c, self.eos_ids) for c in completion_ids]
        if logprobs is None:
            return Generation(ids, None)
        return Generation(ids, [sampled_logprobs(c, lp, t) for c, lp, t in zip(ids, logprobs, token_ids)])


def sampled_logprobs(ids: Sequence[int], logprobs: Sequence[Sequence], token_ids: Sequence[Sequence] | None):
    """The sampled tokens' log-probabilities from vLLM's per-position candidates.

    vLLM returns, per position, up to N+1 candidates sorted by rank (TRL's `extract_logprobs`); the sampled token is
    one of them but not necessarily the first when `logprobs=N > 0`, so it is picked by id from `logprob_token_ids`.
    A value vLLM could not score (None) becomes NaN, which TRL's importance sampling masks.
    """
    out = []
    for pos, token in enumerate(ids):
        candidates = logprobs[pos]
        if token_ids is None:  # no ids to match: only right with logprobs=0 (one candidate, the sampled token)
            value = candidates[0]
        else:
            ranked = list(token_ids[pos])
            if token not in ranked:
                raise RuntimeError(
                    f"vLLM returned no log-probability for the sampled token {token} at position {pos} (candidates "
                    f"{ranked}); vLLM always includes the sampled token, so the completion and logprobs are misaligned."
                )
            value = candidates[ranked.index(token)]
        out.append(float("nan") if value is None else float(value))
    return out


def vllm_is_collective(trainer) -> bool:
    """Whether `trainer.vllm_generation.generate` is a collective call across ranks (see VLLMBackend)."""
    if trainer.accelerator.num_processes == 1:
        return False
    args = trainer.args
    if args.vllm_mode == "server":
        return True
    if args.vllm_tensor_parallel_size > 1:
        return True
    return bool(args.vllm_enable_sleep_mode and _is_sharded(trainer.accelerator))


class CallableBackend:
    """Wraps a plain function `fn(prompts, max_new_tokens, temperature) -> completion_ids` (scripted policies)."""

    def __init__(
        self,
        fn: Callable[[list[list[int]], int, float | None], list[list[int]]],
        lockstep: bool = False,
        eos_ids: Sequence[int] | None = None,
    ):
        self.fn, self.lockstep = fn, lockstep
        self.eos_ids = list(eos_ids) if eos_ids is not None else None  # None: the tokenizer's EOS

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None) -> Generation:
        ids = [list(c)[:max_new_tokens] for c in self.fn(prompts, max_new_tokens, temperature)]
        return Generation(ids, [[0.0] * len(c) for c in ids])


def backend_for_trainer(trainer) -> GenerationBackend:
    """vLLM when the trainer uses it, HF generate otherwise (reusing each episode's KV cache across turns: same
    samples as `HFBackend`, see kv_cache.py)."""
    if getattr(trainer, "use_vllm", False):
        return VLLMBackend.from_trainer(trainer)
    from .kv_cache import KVCacheHFBackend  # it imports this module

    return KVCacheHFBackend.from_trainer(trainer)


def _unwrap(model):
    return getattr(model, "module", model)


def _is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


class RankSync:
    """Cross-rank reductions the lockstep loop needs; a no-op on a single process."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1

    def max_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch

        # accelerate's `reduce` knows only sum/mean; gather + max works on every backend.
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.long)
        return int(self.accelerator.gather(tensor).max().item())
