"""Benchmark 4: rollout + training time per optimizer step as episodes get longer, in both sample modes.

EPOTrainer built through the CLI path (`recipes/cpu/maze_epo.yaml` + overrides) on a large `key` maze that
the random tiny model cannot finish, so every episode lasts exactly `max_turns` turns. Step mode trains one
row per (episode, turn) with a bounded prompt; trajectory mode one row per episode whose length grows with
the turns. Trajectory mode runs twice, side by side: with `HFBackend` (re-prefills the whole conversation every
turn) and with `KVCacheHFBackend` (the trainer's default: keeps each episode's KV cache across turns, same
samples). The first optimizer step (optimizer creation, allocator warm-up) is not reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from .common import Stopwatch, md_table, quiet_logs, recipe_config

SETTINGS = {  # name -> (turn counts, optimizer steps per run; the first is dropped)
    "full": ((10, 20, 40), 2),
    "quick": ((5, 10), 2),
    "smoke": ((2,), 1),
}
VARIANTS = {  # label -> (rollout mode, KV reuse across turns; None = the trainer's default backend)
    "step": ("step", None),
    "trajectory": ("trajectory", False),
    "trajectory + KV reuse": ("trajectory", True),
}


class PrefillCounter:
    """Counts the prompt tokens the backend runs through the model: all of them, unless it reuses a KV cache."""

    def __init__(self, inner):
        self.inner, self.lockstep, self.eos_ids = inner, inner.lockstep, inner.eos_ids
        self.tokens = 0

    def generate(self, prompts, max_new_tokens, temperature=None):
        before = getattr(self.inner, "prefill_tokens", None)
        out = self.inner.generate(prompts, max_new_tokens, temperature)
        self.tokens += sum(map(len, prompts)) if before is None else self.inner.prefill_tokens - before
        return out


def _measure(turns: int, variant: str, steps: int, output_dir: str) -> dict:
    from transformers import PrinterCallback, TrainerCallback

    from epo_trl.cli.train import build_trainer
    from epo_trl.rollout import HFBackend
    from epo_trl.rollout.backends import backend_for_trainer
    from epo_trl.rollout.backends.hf_kv_cache import KVCacheHFBackend

    mode, kv_reuse = VARIANTS[variant]

    overrides = {
        "env_kwargs": {"size": 6, "task": "key", "distractors": 1},
        "require_tags": False,
        "rollout_mode": mode,
        "max_turns": turns,
        "max_turn_tokens": 8,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 4096,  # trajectory rows hold every turn and observation
        "max_steps": steps,
        "report_to": [],
        "disable_tqdm": True,
        "output_dir": output_dir,
    }
    script, rollout_config, args = recipe_config("epo", overrides)
    trainer = build_trainer(script, rollout_config, args)
    trainer.remove_callback(PrinterCallback)  # benchmarks print their own tables
    rollout = trainer.rollout_func
    watch = Stopwatch()
    rollout.play = watch.wrap("rollout", rollout.play)
    records: list[dict] = []
    counter: PrefillCounter | None = None

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            nonlocal counter
            if kv_reuse is None:
                backend = backend_for_trainer(trainer)
            else:
                backend = (KVCacheHFBackend if kv_reuse else HFBackend).from_trainer(trainer)
            counter = PrefillCounter(backend)
            rollout.backend = counter  # one backend for the run: KV reuse drops its cache at every global step

        def on_step_begin(self, *_, **__):
            watch.totals.clear()
            counter.tokens = 0
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            result = rollout.last_result
            if mode == "step":
                tokens = sum(len(t.prompt_ids) + len(t.completion_ids) for e in result.episodes for t in e.turns)
                rows = sum(len(e.turns) for e in result.episodes)
            else:
                tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in result.episodes)
                rows = len(result.episodes)
            step_s = time.perf_counter() - self.t0
            cpu_s = time.process_time() - self.cpu0  # this process's CPU time: robust to other load on the machine
            play_s = watch.totals.get("rollout", 0.0)
            records.append({"step_s": step_s, "cpu_s": cpu_s, "rollout_s": play_s, "gen_s": result.gen_time_s,
                            "env_s": result.env_time_s, "train_s": step_s - play_s, "rows": rows,
                            "train_tokens": tokens, "prefill_tokens": counter.tokens,
                            "mean_turns": statistics.fmean(len(e.turns) for e in result.episodes)})  # fmt: skip

    trainer.add_callback(StepTimer())
    try:
        trainer.train()
    finally:
        rollout.close()
    kept = records[1:] or records
    out = {k: statistics.fmean(r[k] for r in kept) for k in kept[0]}
    out.update(
        turns=turns, mode=mode, variant=variant, episodes=args.per_device_train_batch_size, steps_timed=len(kept)
    )
    return out


def run(quick: bool = False, smoke: bool = False) -> dict:
    quiet_logs()
    turn_counts, steps = SETTINGS["smoke" if smoke else "quick" if quick else "full"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(VARIANTS):
            for turns in turn_counts:
                results[f"{variant}/{turns}"] = _measure(turns, variant, steps, f"{tmp}/{i}-{turns}")
    return results


def to_markdown(results: dict) -> str:
    rows = []
    first, last = {}, {}
    for r in results.values():
        variant = r.get("variant", r["mode"])
        b = first.setdefault(variant, r)
        last[variant] = r
        rows.append(
            [variant, r["turns"], f"{r['mean_turns']:.1f}", int(r["rows"]), int(r["train_tokens"]),
             int(r["prefill_tokens"]), f"{r['rollout_s']:.2f}", f"{r['gen_s']:.2f}", f"{r['env_s']:.3f}",
             f"{r['train_s']:.2f}", f"{r['step_s']:.2f}", f"{r['step_s'] / b['step_s']:.2f}x / {r['turns'] / b['turns']:.0f}x"]
        )  # fmt: skip
    header = ["mode", "max turns", "turns played", "training rows", "trained tokens", "prefill tokens", "rollout s",
              "of which gen s", "of which env s", "training s", "step s", "step time / turns vs first row"]  # fmt: skip
    lines = [
        f"- {v}: step time at {last[v]['turns']} turns = **{last[v]['step_s'] / first[v]['step_s']:.2f}x** the time at "
        f"{first[v]['turns']} turns (turns x{last[v]['turns'] / first[v]['turns']:.0f}; generation "
        f"x{last[v]['gen_s'] / first[v]['gen_s']:.2f}, training x{last[v]['train_s'] / first[v]['train_s']:.2f}; "
        f"process CPU time x{last[v]['cpu_s'] / first[v]['cpu_s']:.2f})"
        for v in first
        if v.startswith("trajectory") and last[v] is not first[v]
    ]
    kv, plain = last.get("trajectory + KV reuse"), last.get("trajectory")
    if kv is not None and plain is not None:
        lines.append(
            f"- KV reuse at {kv['turns']} turns: step {plain['step_s'] / kv['step_s']:.2f}x faster, generation "
            f"{plain['gen_s'] / kv['gen_s']:.2f}x faster, {plain['prefill_tokens'] / kv['prefill_tokens']:.1f}x fewer "
            "prefill tokens"
        )
    return "\n".join([md_table(header, rows), *([""] + lines if lines else [])])
