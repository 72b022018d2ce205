"""Generation backends behind one interface (base.py): HF generate (hf.py, and hf_kv_cache.py reusing each
episode's KV cache across turns), vLLM (vllm.py) and scripted policies (scripted.py)."""

from __future__ import annotations

from .base import Generation, GenerationBackend, RankSync, cut_at_eos, eos_token_ids
from .hf import HFBackend
from .hf_kv_cache import KVCacheHFBackend
from .scripted import CallableBackend
from .vllm import VLLMBackend

__all__ = [
    "CallableBackend",
    "Generation",
    "GenerationBackend",
    "HFBackend",
    "KVCacheHFBackend",
    "RankSync",
    "VLLMBackend",
    "backend_for_trainer",
    "cut_at_eos",
    "eos_token_ids",
]


def backend_for_trainer(trainer) -> GenerationBackend:
    """vLLM when the trainer uses it, HF generate otherwise (reusing each episode's KV cache across turns: same
    samples as `HFBackend`, see hf_kv_cache.py)."""
    if trainer.use_vllm:
        return VLLMBackend.from_trainer(trainer)
    return KVCacheHFBackend.from_trainer(trainer)
