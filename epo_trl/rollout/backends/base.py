"""The generation-backend interface, plus the cross-rank lockstep it may need.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
