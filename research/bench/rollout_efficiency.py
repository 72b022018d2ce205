"""Benchmark 2: generated tokens/s of a multi-turn rollout vs the same backend called directly.

The rollout runs through a recording backend that keeps every `generate` call's prompts; the direct baseline
replays exactly those calls on the same backend. Both start from the same torch seed and make the same calls in
the same order, so they sample the same tokens: the ratio isolates what the engine adds around generation
(env steps, prompt rendering and tokenisation, parsing, decoding). Every rep plays the same seed (the same work);
rollout and replay alternate in one process, which one goes first alternating too, so CPU drift and order
effects hit both; medians are reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from .common import Stopwatch, maze_model, md_table

SETTINGS = {  # name -> (episodes, max_turns, max_turn_tokens, reps)
    "full": (32, 8, 16, 5),
    "quick": (16, 6, 12, 2),
    "smoke": (4, 2, 4, 1),
}


class RecordingBackend:
    """Forwards to `inner` and records each call's arguments and generated-token count."""

    def __init__(self, inner):
        self.inner, self.lockstep = inner, inner.lockstep
        self.calls: list[tuple[list[list[int]], int, float | None]] = []
        self.tokens = 0

    def generate(self, prompts, max_new_tokens, temperature=None):
        self.calls.append(([list(p) for p in prompts], max_new_tokens, temperature))
        out = self.inner.generate(prompts, max_new_tokens, temperature)
        self.tokens += sum(len(c) for c in out.completion_ids)
        return out


def _rollout(engine, tasks, backend, mode: str, seed: int) -> dict:
    import torch

    watch = Stopwatch()
    prompts = engine.prompts
    # Time prompt rendering + tokenisation separately from the rest of the engine's own work.
    saved = {name: getattr(prompts, name) for name in ("turn_text", "encode_prompt", "continuation_ids")}
    for name, fn in saved.items():
        setattr(prompts, name, watch.wrap("prompt", fn))
    texts = []  # the step prompts' user messages, to time their encoding spliced vs in full afterwards
    encode = prompts.encode_prompt
    prompts.encode_prompt = lambda text: texts.append(text) or encode(text)
    recorder = RecordingBackend(backend)
    prompts.clear_cache()  # every rep replays the same texts: time it with cold caches, as if they were all new
    torch.manual_seed(seed)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        result = engine.run(tasks, recorder, mode)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for name in saved:
            delattr(prompts, name)  # back to the class methods
    prompt_s = watch.totals.get("prompt", 0.0)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "gen_s": result.gen_time_s,
        "env_s": result.env_time_s,
        "prompt_s": prompt_s,
        "other_s": wall - result.gen_time_s - result.env_time_s - prompt_s,
        "tokens": recorder.tokens,
        "calls": recorder.calls,
        "turns": sum(len(e.turns) for e in result.episodes),
        "texts": texts,
    }


def _encoding_cost(builder, texts) -> dict:
    """Milliseconds per prompt to tokenise one rollout's user messages: spliced (caches start cold) vs in full."""
    out = {}
    for name, encode in (("spliced", builder.encode_prompt), ("full", builder._encode_full)):
        encode(texts[0])  # the chat template's one-off set-up
        builder.clear_cache()
        t0 = time.perf_counter()
        for text in texts:
            encode(text)
        out[f"{name}_ms_per_prompt"] = 1000 * (time.perf_counter() - t0) / len(texts)
    return out


def _replay(backend, calls, seed: int) -> tuple[float, int, float]:
    import torch

    torch.manual_seed(seed)
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for prompts, max_new, temperature in calls:
        tokens += sum(len(c) for c in backend.generate(prompts, max_new, temperature).completion_ids)
    return time.perf_counter() - t0, tokens, time.process_time() - c0


def run(quick: bool = False, smoke: bool = False) -> dict:
    import torch

    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import HFBackend, RolloutConfig, RolloutEngine

    episodes, max_turns, turn_tokens, reps = SETTINGS["smoke" if smoke else "quick" if quick else "full"]
    # A maze a random policy rarely finishes, so most episodes use the whole turn budget.
    factory = MazeFactory(size=4, task="key", distractors=1)
    config = RolloutConfig(max_turns=max_turns, max_turn_tokens=turn_tokens, require_tags=False, num_workers=4)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, tokenizer, model = maze_model(tmp, hidden_size=64)
        backend = HFBackend(model, tokenizer, temperature=1.0)
        tasks = factory.tasks("train")[:episodes]
        for mode in ("step", "trajectory"):
            engine = RolloutEngine(factory, tokenizer, config)
            rollouts, replays = [], []
            try:
                # Warm-up, and the calls to replay: the same seed every rep makes every rep the same work.
                warm = _rollout(engine, tasks, backend, mode, seed=0)
                calls = warm["calls"]
                encoding = _encoding_cost(engine.prompts, warm["texts"]) if mode == "step" else {}
                for rep in range(reps):
                    if rep % 2:  # alternate which of the pair runs first, so order effects cancel
                        direct_s, direct_tokens, direct_cpu = _replay(backend, calls, seed=0)
                        r = _rollout(engine, tasks, backend, mode, seed=0)
                    else:
                        r = _rollout(engine, tasks, backend, mode, seed=0)
                        direct_s, direct_tokens, direct_cpu = _replay(backend, calls, seed=0)
                    r["same_tokens"] = direct_tokens == r["tokens"]  # same seed, same calls: same samples
                    rollouts.append(r)
                    replays.append((direct_s, direct_tokens))
                    r["direct_cpu_s"] = direct_cpu
            finally:
                engine.close()
            med = {k: statistics.median(r[k] for r in rollouts) for k in ("wall_s", "gen_s", "env_s", "prompt_s")}
            med["other_s"] = statistics.median(r["other_s"] for r in rollouts)
            direct_s = statistics.median(d for d, _ in replays)
            tokens = statistics.median(r["tokens"] for r in rollouts)
            direct_tps = statistics.median(n / d for d, n in replays)
            rollout_tps = statistics.median(r["tokens"] / r["wall_s"] for r in rollouts)
            results[mode] = {
                "episodes": episodes,
                "max_turns": max_turns,
                "max_turn_tokens": turn_tokens,
                "reps": reps,
                "turns": rollouts[0]["turns"],
                "backend_calls": len(rollouts[0]["calls"]),
                "tokens": tokens,
                "rollout_tokens_per_s": rollout_tps,
                "direct_tokens_per_s": direct_tps,
                "ratio": rollout_tps / direct_tps,
                # CPU seconds of the same work (all threads of this process): robust to other processes' load
                "cpu_ratio": statistics.median(r["direct_cpu_s"] / r["cpu_s"] for r in rollouts),
                "replay_matched_tokens": all(r["same_tokens"] for r in rollouts),
                "direct_s": direct_s,
                **{k: med[k] for k in ("wall_s", "gen_s", "env_s", "prompt_s", "other_s")},
                "torch_threads": torch.get_num_threads(),
                **encoding,
            }
    return results


def to_markdown(results: dict) -> str:
    rows = []
    for mode, r in results.items():
        wall = r["wall_s"]
        rows.append(
            [
                mode,
                f"{r['episodes']} x <= {r['max_turns']}",
                r["backend_calls"],
                int(r["tokens"]),
                f"{r['rollout_tokens_per_s']:.0f}",
                f"{r['direct_tokens_per_s']:.0f}",
                f"**{r['ratio']:.3f}**",
                f"{r['cpu_ratio']:.3f}" if "cpu_ratio" in r else "—",
                f"{r['gen_s']:.2f} ({100 * r['gen_s'] / wall:.0f}%)",
                f"{r['env_s']:.3f} ({100 * r['env_s'] / wall:.1f}%)",
                f"{r['prompt_s']:.3f} ({100 * r['prompt_s'] / wall:.1f}%)",
                f"{r['other_s']:.3f} ({100 * r['other_s'] / wall:.1f}%)",
            ]
        )
    header = ["mode", "episodes x turns", "generate calls", "tokens", "rollout tok/s", "direct tok/s",
              "ratio (target >= 0.95)", "ratio by CPU time", "gen s", "env s", "prompt render s", "other s"]  # fmt: skip
    lines = [
        f"- {mode} prompts: tokenising one prompt takes {r['spliced_ms_per_prompt']:.3f} ms with the cached constant "
        f"parts spliced in vs {r['full_ms_per_prompt']:.3f} ms encoding it in full "
        f"({r['full_ms_per_prompt'] / r['spliced_ms_per_prompt']:.1f}x)"
        for mode, r in results.items()
        if "spliced_ms_per_prompt" in r
    ]
    return "\n".join([md_table(header, rows), *([""] + lines if lines else [])])
