"""Benchmark 1: EPOTrainer vs GRPOTrainer loss step (forward + backward) time and peak memory.

Three variants compute the loss on the same model and the same multi-turn batch:
  grpo   GRPOTrainer, no entropy term (TRL's default)
  bonus  GRPOTrainer with TRL's built-in entropy bonus (entropy_coef = 0.001; this is EPO-Base)
  epo    EPOTrainer: the same bonus + EPO's smoothing hinge and per-turn history
EPO's own overhead is epo / bonus (the smoothing machinery); epo / grpo adds the cost of back-propagating any
entropy term through the full-vocabulary softmax, which every entropy method pays. Time is measured with the
variants interleaved in one process (so drift hits all), peak memory in a fresh subprocess per variant (peak RSS
or CUDA peak during the steps minus before them, so model loading is not counted).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from .common import rss_mb

MODELS = {
    # name: (hidden_size, layers, vocab_size)
    "tiny (vocab 0.5k)": (64, 2, None),
    "small (vocab 32k)": (128, 2, 32768),
}
VARIANTS = ("grpo", "bonus", "epo")
SMOKE_MODELS = {"tiny (vocab 0.5k)": (32, 1, None)}  # tests: seconds, not minutes
# `--device cuda`: a random model with Qwen2.5-0.5B's shape, in bf16 (hidden, layers, vocab).
CUDA_MODELS = {"Qwen2.5-0.5B-shaped (vocab 152k, bf16)": (896, 24, 151936)}


def _build_qwen05b_shape(path: str) -> str:
    """A random Qwen2 with Qwen2.5-0.5B's dimensions (14 heads, 2 KV heads, MLP 4864), saved in bf16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from epo_trl.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    hidden, layers, vocab = next(iter(CUDA_MODELS.values()))
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trainer(kind: str, model_path: str, out: str, device: str = "cpu"):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from epo_trl import EPOConfig, EPOTrainer

    common = dict(
        output_dir=out,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=128,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        report_to=[],
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    ds = Dataset.from_dict({"prompt": ["go north"] * 8})
    reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    if kind in ("grpo", "bonus"):
        args = GRPOConfig(**common, entropy_coef=0.001 if kind == "bonus" else 0.0)
        return GRPOTrainer(model_path, reward, args=args, train_dataset=ds)
    args = EPOConfig(**common, entropy_coef=0.001, smoothing_coef=0.1)
    trainer = EPOTrainer(model_path, reward, args=args, train_dataset=ds)
    # A reference for 4 turns, so the hinge is live on every action token.
    trainer.entropy_history.update({t: 1.0 for t in range(4)})
    return trainer


def _batch(vocab: int, rows: int = 8, prompt: int = 64, completion: int = 256, turns: int = 4, device: str = "cpu"):
    """Multi-turn rows: `turns` action runs separated by observation tokens (tool_mask 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    tool_mask = torch.ones(rows, completion, dtype=torch.long)
    span = completion // turns
    for t in range(1, turns):
        tool_mask[:, t * span : t * span + span // 4] = 0  # observation tokens between action runs
    batch = {
        "prompt_ids": torch.randint(5, vocab, (rows, prompt), generator=g),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(5, vocab, (rows, completion), generator=g),
        "completion_mask": torch.ones(rows, completion, dtype=torch.long),
        "tool_mask": tool_mask,
        "advantages": torch.linspace(-1, 1, rows),
        "num_items_in_batch": tool_mask.sum().float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _step(trainer, inputs) -> None:
    trainer.model.zero_grad(set_to_none=True)
    # bf16 (`--device cuda`) as training computes it: a training step gets accelerate's autocast from the prepared
    # model's forward, but this loop calls compute_loss on the bare model. In fp32 it is a no-op.
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()


class _OwnTimer:
    """Times EPO's own forward-side work inside each EPO loss call: EPOTrainer._compute_loss minus the
    GRPOTrainer._compute_loss it wraps (turn ids, hinge, per-turn statistics, history update). Both are measured
    in the same call, so machine noise that slows the whole step cancels out."""

    def __init__(self, trainer):
        from trl import GRPOTrainer

        self.own: list[float] = []
        self._grpo, inner = GRPOTrainer._compute_loss, []
        epo_loss = type(trainer)._compute_loss

        def timed_grpo(this, model, inputs):
            t0 = time.perf_counter()
            out = self._grpo(this, model, inputs)
            inner.append(time.perf_counter() - t0)
            return out

        def timed_epo(model, inputs):
            inner.clear()
            t0 = time.perf_counter()
            out = epo_loss(trainer, model, inputs)
            self.own.append(time.perf_counter() - t0 - sum(inner))
            return out

        GRPOTrainer._compute_loss = timed_grpo  # EPOTrainer's super() call resolves here
        trainer._compute_loss = timed_epo  # compute_loss calls self._compute_loss: the instance attribute wins

    def close(self) -> None:
        from trl import GRPOTrainer

        GRPOTrainer._compute_loss = self._grpo


def _prepare(kind: str, model_path: str, out: str, device: str = "cpu"):
    trainer = _trainer(kind, model_path, out, device)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def memory_child(kind: str, model_path: str, vocab: int, reps: int, device: str = "cpu") -> None:
    """Subprocess entry: print JSON {'peak_increment_mb': ...} for one variant (CUDA: peak allocated memory)."""
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer = _prepare(kind, model_path, out, device)
        inputs = _batch(vocab, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = rss_mb()
        for _ in range(reps):
            _step(trainer, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"peak_increment_mb": max(peak - before, 0.0)}))


def run(quick: bool = False, smoke: bool = False, device: str = "cpu") -> dict:
    """`smoke`: one tiny model, one rep (tests); `device="cuda"`: the Qwen2.5-0.5B-shaped bf16 model on a GPU."""
    import torch

    from epo_trl.models.tiny import build_tiny_model

    reps = 1 if smoke else 3 if quick else 20
    models = CUDA_MODELS if device == "cuda" else SMOKE_MODELS if smoke else MODELS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (hidden, layers, vocab) in models.items():
            folder = os.path.join(tmp, name.split()[0])
            if device == "cuda":
                path = _build_qwen05b_shape(folder)
            else:
                path = build_tiny_model(folder, hidden_size=hidden, num_layers=layers, vocab_size=vocab)
            from transformers import AutoConfig

            real_vocab = AutoConfig.from_pretrained(path).vocab_size
            trainers = {k: _prepare(k, path, os.path.join(tmp, k), device) for k in VARIANTS}
            inputs = _batch(real_vocab, device=device)
            sync = torch.cuda.synchronize if device == "cuda" else lambda: None
            times = {k: [] for k in trainers}
            for k in trainers:  # warm-up
                _step(trainers[k], inputs)
            own = _OwnTimer(trainers["epo"])
            names = list(trainers)
            for rep in range(reps):
                # Interleaved in one process, in a rotating order so no variant always runs after the same one.
                for k in names[rep % len(names) :] + names[: rep % len(names)]:
                    trainer = trainers[k]
                    torch.manual_seed(0)
                    sync()
                    t0 = time.perf_counter()
                    _step(trainer, inputs)
                    sync()
                    times[k].append(time.perf_counter() - t0)
            own.close()
            mem = {}
            for k in trainers:
                proc = subprocess.run(
                    [sys.executable, "-m", "research.bench.loss_overhead", "--memory-child", k, path, str(real_vocab),
                     str(1 if smoke else max(reps // 4, 2)), device],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                mem[k] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_increment_mb"]
            med = {k: statistics.median(v) for k, v in times.items()}
            # Per-repetition ratios (the variants of one repetition ran back to back): their spread is the noise.
            pairs = sorted(e / b for e, b in zip(times["epo"], times["bonus"]))
            results[name] = {
                "ratio_vs_bonus_p25": pairs[len(pairs) // 4],
                "ratio_vs_bonus_p75": pairs[(3 * len(pairs)) // 4],
                "epo_own_ms": 1e3 * statistics.median(own.own),
                "epo_own_share": statistics.median(own.own) / med["epo"],
                "vocab": real_vocab,
                **{f"{k}_step_s": med[k] for k in VARIANTS},
                **{f"{k}_peak_mb": mem[k] for k in VARIANTS},
                "time_ratio_vs_bonus": med["epo"] / med["bonus"],
                "time_ratio": med["epo"] / med["grpo"],
                "memory_ratio_vs_bonus": _ratio(mem["epo"], mem["bonus"]),
                "memory_ratio": _ratio(mem["epo"], mem["grpo"]),
                "reps": reps,
                "device": device,
            }
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def to_markdown(results: dict) -> str:
    lines = [
        "| model | vocab | step s: GRPO / +bonus / EPO | **time EPO / bonus** (per-rep p25-p75) "
        "| EPO's own code, ms (share of step) | time EPO / GRPO "
        "| peak +MB: GRPO / +bonus / EPO | **memory EPO / bonus** | memory EPO / GRPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        steps = " / ".join(f"{r[f'{k}_step_s']:.4f}" for k in VARIANTS)
        peaks = " / ".join(f"{r[f'{k}_peak_mb']:.1f}" for k in VARIANTS)
        lines.append(
            f"| {name} | {r['vocab']} | {steps} | **{r['time_ratio_vs_bonus']:.3f}** "
            f"({r['ratio_vs_bonus_p25']:.3f}-{r['ratio_vs_bonus_p75']:.3f}) "
            f"| {r['epo_own_ms']:.2f} ({100 * r['epo_own_share']:.1f}%) | {r['time_ratio']:.3f} "
            f"| {peaks} | **{r['memory_ratio_vs_bonus']:.3f}** | {r['memory_ratio']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:7])
    else:
        print(to_markdown(run(quick="--quick" in sys.argv)))
