"""Scripted policies as generation backends (tests, warm-start demonstrators, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Generation


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
