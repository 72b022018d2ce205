"""HF `generate` as a generation backend (the path without vLLM)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from .base import Generation, cut_at_eos, eos_token_ids, is_sharded

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
        self.lockstep = bool(accelerator is not None and accelerator.num_processes > 1 and is_sharded(accelerator))

    @classmethod
    def from_trainer(cls, trainer, **overrides) -> HFBackend:
        kwargs = trainer.generation_kwargs  # TRL's HF-generate kwargs (set when the trainer does not use vLLM)
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


def _unwrap(model):
    return getattr(model, "module", model)
