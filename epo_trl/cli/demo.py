"""`python -m epo_trl demo`: EPO on the built-in maze with a tiny model, offline, on CPU — a run that visibly learns.

What it does: builds a tiny Qwen2 model whose tokenizer covers the maze, warm-starts it by behaviour cloning
(standing in for the instruction-tuned LLM a real run starts from), evaluates it on held-out tasks, trains
`EPOTrainer` on multi-turn episodes with the paper's strict `<action>...</action>` format and reward, evaluates
again, and writes `final_metrics.json`, TensorBoard logs and PNG plots (success rate, return, per-turn entropy, EPO's
band) to the run folder. Rollouts are in trajectory mode (one row per episode, turns told apart by the env mask;
EPO's per-turn entropy is taken per turn inside the row); `--rollout-mode step` trains one row per turn instead.
Its settings are the study's EPO run (`python -m epo_trl.study`, tested), so docs/study.md holds its spread over
seeds.

Why the setting is what it is (measured, negative results included: docs/study/setting.md):
- model: hidden size 64. A hidden-32 model only learns the action format (its probability of the right direction
  on expert states stays at chance, 0.24); hidden 64 learns to read the listed exits.
- warm start, two phases: behaviour cloning on the expert until the model, sampling, wins 90% of 32 train tasks
  (it then reads the exits and its history; when that happens varies from 250 to 850 steps between seeds), then
  300 steps on a *noisy demonstrator*'s plays (each turn a random admissible action with probability
  `--warmstart-noise`, else the expert's move from where it stands). The model converges towards the
  demonstrator's mixture: it reads the observation and writes valid actions but wanders, like an instruction-tuned
  LLM that knows the format but not the task, with held-out success 0.22-0.44 over 5 seeds whatever the first
  phase took. Cloning only the noisy demonstrator leaves some seeds unable to read the exits at all.
- a KL anchor to the warm start (`beta`): without it the policy gradient drifted in step mode (long losing episodes
  put more negative-advantage rows on the shared format tokens) and invalid actions took over.
- trajectory mode: 40 steps took 86-127 s of RL against 145-202 s in step mode (same machine load) and learned at
  least as well per step; on an idle 2-core CPU the demo's 40 steps take ~40 s. Over 5 seeds the held-out gain is
  +0.41 +- 0.11 (4 of 5 seeds >= 0.30; docs/study.md, EPO row).
- `scale_rewards="batch"`: with per-group std normalisation a group without a win turns one extra invalid turn
  (-0.1) into an advantage as large as a win (+10); the batch std keeps the win signal dominant.
- held-out success is measured on 64 unseen layouts of the trained size (`valid_seen`) that the expert solves within
  the turn limit; `valid_unseen` (3x3 mazes, room numbers the model never saw) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

# The demo's setting (see the module docstring for why); flags override the ones users may want to vary.
HIDDEN_SIZE = 64
MAX_TURNS = 6
MAX_TURN_TOKENS = 12
KL_BETA = 0.1
SCALE_REWARDS = "batch"
EPISODES_PER_STEP, GROUP = 32, 8
MAX_STEPS = 40
LEARNING_RATE = 2e-3
# EPO's coefficients: those of recipes/cpu/maze_epo.yaml, so the study's EPO row is this demo (tested).
EPO_COEFFICIENTS = {
    "entropy_coef": 0.01,
    "smoothing_coef": 0.1,
    "smoothing_kappa_low": 0.0,
    "smoothing_kappa_high": 2.0,
}
ROLLOUT_MODE = "trajectory"
# The warm start fits 64 train tasks better than the default 256 (same 600 steps): 0.19 vs 0.05 held-out success,
# and only the former leaves RL a start it improves on in 40 steps (docs/study/setting.md).
NUM_TRAIN = 64
# epo_trl.models.warmstart.warm_start: expert cloning (at most `steps`) until `target_success`, then the noisy demonstrator.
WARM_START = {"steps": 1200, "target_success": 0.9, "check_every": 50, "noisy_steps": 300, "noise": 0.85}
QUICK_WARM_START = {"steps": 20, "target_success": None, "check_every": 50, "noisy_steps": 10, "noise": 0.85}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epo-trl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", help="run folder (model, TensorBoard logs, metrics)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help=f"optimizer steps (default {MAX_STEPS}; 2 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a short CI run (< ~60 s)")
    parser.add_argument(
        "--warmstart-steps",
        type=int,
        default=None,
        help=f"cap on expert behaviour-cloning steps (default {WARM_START['steps']}, stopping early once sampled train "
        f"success reaches {WARM_START['target_success']}; 20 with --quick; 0 = no warm start: a random model)",
    )
    parser.add_argument(
        "--warmstart-noise",
        type=float,
        default=WARM_START["noise"],
        help="in the warm start's second phase, the share of the demonstrator's turns that are a random admissible "
        "action instead of the expert's move",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the warm start, RL and evaluation")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks per split (default 64; 8)")
    parser.add_argument("--eval-temperature", type=float, default=1.0, help="sampling temperature of evaluation")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument(
        "--rollout-mode",
        choices=("trajectory", "step"),
        default=ROLLOUT_MODE,
        help="one row per episode (default) or one row per turn",
    )
    return parser.parse_args(argv)


def evaluate_held_out(
    model, tokenizer, factory, config, tasks_per_split: int, temperature: float, seed: int, mode: str = "step"
) -> dict:
    """Success rate (and mean return / invalid rate) per held-out split, with HF generate, prompts as in `mode`."""
    import torch

    from ..rollout import HFBackend, run_episodes

    model.eval()
    backend = HFBackend(model, tokenizer, temperature=temperature)
    out = {}
    with torch.random.fork_rng():  # the same sampling seed before and after training
        torch.manual_seed(seed)
        for split in ("valid_seen", "valid_unseen"):
            records = run_episodes(backend, factory, factory.tasks(split)[:tasks_per_split], tokenizer, config, mode)
            turns = sum(r["length"] for r in records)
            out[split] = {
                "success_rate": sum(r["won"] for r in records) / len(records),
                "mean_return": sum(r["return"] for r in records) / len(records),
                "invalid_action_rate": sum(r["invalid"] for r in records) / max(turns, 1),
                "episodes": len(records),
            }
    model.train()
    return out


def demo_words(factory) -> list[str]:
    """Every word of the env and of the turn prompts: the tiny tokenizer holds each whole (one token per word)."""
    from ..models.tiny import build_tokenizer, words_of
    from ..rollout import PromptBuilder

    return [
        *factory.vocabulary(),
        *words_of(PromptBuilder(build_tokenizer(), factory.prompt_header).vocabulary_texts()),
    ]


def _last(history: list[dict], prefix: str) -> dict[str, float]:
    """The last logged value of every metric whose name starts with `prefix`."""
    values: dict[str, float] = {}
    for entry in history:
        values.update({k: v for k, v in entry.items() if k.startswith(prefix)})
    return values


def _mean(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return sum(values) / len(values) if values else None


def demo_configs(opts: argparse.Namespace, output_dir: str):
    """The demo's (RolloutConfig, EPOConfig) for parsed options `opts`."""
    from .. import EPOConfig
    from ..rollout import RolloutConfig

    config = RolloutConfig(max_turns=3 if opts.quick else MAX_TURNS, max_turn_tokens=MAX_TURN_TOKENS)
    args = EPOConfig(
        output_dir=output_dir,
        max_steps=opts.max_steps or (2 if opts.quick else MAX_STEPS),
        per_device_train_batch_size=8 if opts.quick else EPISODES_PER_STEP,
        num_generations=4 if opts.quick else GROUP,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        beta=KL_BETA,
        scale_rewards=SCALE_REWARDS,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=["tensorboard"],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=False,
        seed=opts.seed,
        **EPO_COEFFICIENTS,
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(argv or []))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    eval_tasks = opts.eval_tasks or (8 if opts.quick else 64)
    warm_cfg = dict(QUICK_WARM_START if opts.quick else WARM_START, noise=opts.warmstart_noise)
    if opts.warmstart_steps is not None:
        warm_cfg["steps"] = opts.warmstart_steps
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from transformers import AutoTokenizer

    from .. import EPOTrainer
    from ..envs import task_dataset
    from ..envs.maze import MazeFactory
    from ..models.tiny import build_tiny_model
    from ..models.warmstart import warm_start
    from ..rollout import StepRollout, TrajectoryRollout, episode_return_reward
    from .console import use_console
    from .plots import write_run_plots

    factory = MazeFactory(size=2, task="reach", distractors=0, num_train=NUM_TRAIN, num_valid=eval_tasks)
    config, args = demo_configs(opts, str(out))
    model_dir = build_tiny_model(str(out / "model"), demo_words(factory), hidden_size=HIDDEN_SIZE, seed=opts.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm = {"steps": 0, "noisy_steps": 0, "expert_samples": 0}
    if warm_cfg["steps"] > 0:
        warm = warm_start(model_dir, factory, factory.tasks("train"), config, mode=opts.rollout_mode, seed=opts.seed,
                          log=print, **warm_cfg)  # fmt: skip
    warm_seconds = time.perf_counter() - started

    rollout = (StepRollout if opts.rollout_mode == "step" else TrajectoryRollout)(factory, config)
    trainer = EPOTrainer(
        model=model_dir,
        reward_funcs=[episode_return_reward],
        args=args,
        train_dataset=task_dataset(factory, "train"),
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    use_console(trainer)
    evaluate = partial(evaluate_held_out, trainer.model, tokenizer, factory, config, eval_tasks,
                       opts.eval_temperature, opts.seed, opts.rollout_mode)  # fmt: skip
    before = evaluate()
    train_started = time.perf_counter()
    try:
        trainer.train()
    finally:
        rollout.close()
    train_seconds = time.perf_counter() - train_started
    after = evaluate()

    history = trainer.state.log_history
    train_logs = [h for h in history if "rollout/success_rate" in h]
    quarter = max(len(train_logs) // 4, 1)
    turn_entropy = {k.rsplit("/", 1)[-1]: v for k, v in _last(history, "epo/turn_entropy/").items()}
    plots = write_run_plots(history, str(out / "plots"), args.smoothing_kappa_low, args.smoothing_kappa_high)
    metrics = {
        "seed": opts.seed,
        "max_steps": args.max_steps,
        "setting": {
            "rollout_mode": opts.rollout_mode,
            "hidden_size": HIDDEN_SIZE,
            "max_turns": config.max_turns,
            "warmstart_noise": opts.warmstart_noise,
            "beta": KL_BETA,
            "scale_rewards": SCALE_REWARDS,
            "learning_rate": opts.learning_rate,
            **EPO_COEFFICIENTS,
            "episodes_per_step": args.per_device_train_batch_size,
            "group": args.num_generations,
        },
        "warm_start": warm,
        "global_step": trainer.state.global_step,
        "warm_start_seconds": round(warm_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "eval_before": before,
        "eval_after": after,
        "gain": {s: after[s]["success_rate"] - before[s]["success_rate"] for s in before},
        "train_success_first_quarter": _mean(train_logs[:quarter], "rollout/success_rate"),
        "train_success_last_quarter": _mean(train_logs[-quarter:], "rollout/success_rate"),
        "train_first_step": {
            k: v for k, v in (train_logs or [{}])[0].items() if k.startswith(("rollout/", "entropy"))
        },
        "train_last_step": {
            k: v for k, v in (train_logs or [{}])[-1].items() if k.startswith(("rollout/", "entropy"))
        },
        "epo": _last(history, "epo/"),
        "entropy_per_turn": dict(sorted(turn_entropy.items(), key=lambda kv: int(kv[0]))),
        "plots": plots,
    }
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    _report(metrics, out)
    return 0


def _report(m: dict, out: Path) -> None:
    s = m["setting"]
    print(f"\n=== EPO demo: maze 'reach' 2x2, tiny model, CPU, {s['rollout_mode']} mode ===")
    print(
        f"setting: hidden {s['hidden_size']}; warm start {m['warm_start']['steps']} behaviour-cloning steps on the "
        f"expert, then {m['warm_start']['noisy_steps']} on a demonstrator that takes a random admissible action "
        f"{s['warmstart_noise']:.0%} of the time (the start reads the exits but wanders); KL anchor beta={s['beta']}; "
        f"scale_rewards={s['scale_rewards']!r} (the +10 win, not the -0.1 invalid-turn penalty, dominates "
        f"advantages); EPO entropy_coef {s['entropy_coef']}, smoothing band [{s['smoothing_kappa_low']}, "
        f"{s['smoothing_kappa_high']}] x its history; "
        f"{s['episodes_per_step']} episodes/step in groups of {s['group']}, lr {s['learning_rate']}, "
        f"max {s['max_turns']} turns; seed {m['seed']}"
    )
    print(
        f"steps: {m['global_step']}; warm start {m['warm_start_seconds']:.1f}s, RL training {m['train_seconds']:.1f}s, "
        f"total {m['total_seconds']:.1f}s"
    )
    for split, what in (("valid_seen", "unseen 2x2 layouts"), ("valid_unseen", "3x3 mazes, never trained on")):
        b, a = m["eval_before"][split], m["eval_after"][split]
        print(
            f"{split:>12} ({what}): success {b['success_rate']:.3f} -> {a['success_rate']:.3f} "
            f"({a['success_rate'] - b['success_rate']:+.3f}, {a['episodes']} episodes); invalid actions "
            f"{b['invalid_action_rate']:.3f} -> {a['invalid_action_rate']:.3f}"
        )
    if m["train_success_first_quarter"] is not None:
        print(
            f"train success, mean over the first / last quarter of steps: {m['train_success_first_quarter']:.3f} -> "
            f"{m['train_success_last_quarter']:.3f}"
        )
    if m["entropy_per_turn"]:
        print("entropy per turn (last step): " + ", ".join(f"t{t}={v:.3f}" for t, v in m["entropy_per_turn"].items()))
    for path in m["plots"]:
        print(f"plot: {path}")
    print(f"run folder: {out} (final_metrics.json, TensorBoard logs under {out}/runs)")


if __name__ == "__main__":
    raise SystemExit(main())
