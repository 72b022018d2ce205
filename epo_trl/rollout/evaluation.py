"""Evaluation: play tasks k times with any generation backend and summarise success, return, length, pass@k.

One implementation for `epo-trl eval`, the demo's and the study's held-out numbers, and the warm start's checks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..envs.protocol import EnvFactory, TaskSpec
from .config import RolloutConfig
from .engine import RolloutEngine, engine_for, run_episodes

HELD_OUT_SPLITS = ("valid_seen", "valid_unseen")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c successes: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: Sequence[dict[str, Any]], factory: EnvFactory, k: int) -> dict[str, Any]:
    """Aggregate per-episode records (k per task) into the evaluation summary."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for key, recs in by_task.items():
        by_type[factory.task_type(TaskSpec.parse(key))].extend(recs)

    def stats(recs: list[dict]) -> dict[str, float]:
        n = len(recs)
        return {
            "episodes": n,
            "success_rate": sum(r["won"] for r in recs) / n,
            "mean_return": sum(r["return"] for r in recs) / n,
            "mean_length": sum(r["length"] for r in recs) / n,
            "invalid_rate": sum(r["invalid"] for r in recs) / max(sum(r["length"] for r in recs), 1),
            "failed": sum(bool(r["failed"]) for r in recs),
            # the tokens the model read per turn (prefill): what the prompt layout costs
            "prompt_tokens_per_turn": sum(t.get("context_tokens", 0) for r in recs for t in r.get("turns", ()))
            / max(sum(len(r.get("turns", ())) for r in recs), 1),
        }

    if not records:
        raise ValueError("No episode to summarise.")
    summary = {"tasks": len(by_task), "k": k, **stats(list(records))}
    summary[f"pass@{k}"] = sum(pass_at_k(len(v), sum(r["won"] for r in v), k) for v in by_task.values()) / len(by_task)
    summary["per_type"] = {t: stats(v) for t, v in sorted(by_type.items())}
    return summary


def evaluate(
    backend,
    factory: EnvFactory,
    tasks: Sequence[TaskSpec],
    tokenizer,
    config: RolloutConfig | None = None,
    k: int = 1,
    mode: str = "step",
    batch_size: int = 64,
    progress: bool = True,
    on_batch=None,
    temperature: float | None = None,
    engine: RolloutEngine | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Play every task k times (lockstep batches of `batch_size` episodes); return (summary, records).
    `on_batch(records)` is called with all records so far after every batch (streaming, Ctrl-C safety).
    `temperature`: the sampling temperature (None = the backend's). `engine`: an open engine to play on (the
    caller closes it); None = one for this call. The batches share the engine's envs: a TextWorldExpress env
    is a JVM, ~5x dearer to start than to reset (docs/benchmarks.md, section 3)."""
    from tqdm.auto import tqdm

    episodes = [t for t in tasks for _ in range(k)]
    records: list[dict[str, Any]] = []
    with (
        engine_for(factory, tokenizer, config, engine) as engine,
        tqdm(total=len(episodes), desc="eval episodes", disable=not progress) as bar,
    ):
        for start in range(0, len(episodes), batch_size):
            chunk = episodes[start : start + batch_size]
            records.extend(run_episodes(backend, factory, chunk, tokenizer, config, mode, temperature, engine))
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(records)
    return summarize(records, factory, k), records


def sampled_summary(model, tokenizer, factory: EnvFactory, tasks: Sequence[TaskSpec], config: RolloutConfig,
                    temperature: float = 1.0, seed: int = 0, mode: str = "step",
                    engine: RolloutEngine | None = None) -> dict[str, Any]:  # fmt: skip
    """`evaluate` of an HF model sampling at `temperature` (HF generate), under a fixed sampling seed (the same
    draws before and after training) and in eval mode, restored after. `engine`: as in `evaluate`."""
    import torch

    from .backends.hf import HFBackend

    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backend = HFBackend(model, tokenizer, temperature=temperature)
            return evaluate(backend, factory, tasks, tokenizer, config, mode=mode, progress=False, engine=engine)[0]
    finally:
        model.train(training)


def held_out(model, tokenizer, factory: EnvFactory, config: RolloutConfig, tasks_per_split: int,
             temperature: float = 1.0, seed: int = 0, mode: str = "step") -> dict[str, dict[str, Any]]:  # fmt: skip
    """`sampled_summary` on the first `tasks_per_split` tasks of each held-out split (one engine: the splits share
    its envs)."""
    with engine_for(factory, tokenizer, config) as engine:
        return {
            split: sampled_summary(
                model,
                tokenizer,
                factory,
                factory.tasks(split)[:tasks_per_split],
                config,
                temperature,
                seed,
                mode,
                engine,
            )
            for split in HELD_OUT_SPLITS
        }
