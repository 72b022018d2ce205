"""`python -m epo_trl demo`: EPO on the built-in maze with a tiny model, offline, on CPU: an agent that learns to win
mazes it never saw.

What it does: builds a tiny Qwen2 model whose tokenizer covers the maze, warm-starts it by behaviour cloning
(standing in for the instruction-tuned LLM a real run starts from), evaluates it on held-out mazes, trains
`EPOTrainer` on multi-turn episodes with the paper's strict `<action>...</action>` format and reward, evaluates
again, and prints both next to policies that learn nothing on the same mazes (random, the walker, the expert: the
ceiling; `epo_trl.rollout.baselines`). It writes `final_metrics.json`, TensorBoard logs and PNG plots (success rate,
return, per-turn entropy, EPO's band) to the run folder. Rollouts are in trajectory mode (one row per episode, turns
told apart by the env mask; EPO's per-turn entropy is taken per turn inside the row); `--rollout-mode step` trains
one row per turn instead. Its settings are one recipe, `recipes/cpu/demo.yaml`, trained through `epo-trl train`'s
own path; the study (`python -m research.study`) trains the same file for every method and seed, so docs/study.md
holds its spread.

`--llm` runs the same on a real pretrained model (recipes/cpu/demo_llm.yaml, `make demo-llm`): SmolLM2-135M-Instruct,
warm-started with TRL's SFTTrainer (epo_trl.models.sft), rollouts and all three held-out evaluations (zero-shot,
after the warm start, after RL) on the trainer's vLLM engine when vLLM is installed. Its choices:
docs/quickstart.md, section 4; its spread over seeds against GRPO: `python -m research.study_llm`.

Why the setting is what it is (measured, with the settings it replaced: docs/study/setting.md):
- the maze's `trail` task, 4x4: signs point the way, so an agent that reads the observation can win mazes it never
  saw, and the policies that learn nothing (which do not read it) stay far below the ceiling. Held-out mazes are
  unseen by content (`MazeFactory.content_key`), `valid_seen` of the trained size, `valid_unseen` one size larger.
- warm start, two phases: behaviour cloning on the expert until the model, sampling, wins 90% of 32 train tasks,
  then steps on a *noisy demonstrator*'s plays (each turn a random admissible action with probability
  `--warmstart-noise`, else the expert's move from where it stands): the model writes valid actions and half-reads
  the signs, above the random policy and well below the expert, so RL has room.
- a KL anchor to the warm start (`beta`) and `scale_rewards="batch"`: with per-group std normalisation a group
  without a win turns one extra invalid turn (-0.1) into an advantage as large as a win (+10).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# --quick: a short CI run of the same recipe (< ~60 s)
QUICK = {"max_steps": 2, "tasks_per_step": 2, "num_generations": 4, "max_turns": 3, "warmstart_steps": 20,
         "warmstart_target_success": None, "warmstart_noisy_steps": 10}  # fmt: skip
QUICK_LLM = {**QUICK, "warmstart_steps": 2, "warmstart_noisy_steps": 2}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epo-trl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", action="store_true",
                        help="the real-model demo: SmolLM2-135M-Instruct, warm-started with TRL's SFTTrainer, rollouts "
                        "on vLLM when installed (recipes/cpu/demo_llm.yaml; make demo-llm)")  # fmt: skip
    parser.add_argument("--output-dir", default=None,
                        help="run folder (model, TensorBoard logs, metrics); default runs/demo or runs/demo-llm")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--quick", action="store_true", help="a short CI run (< ~60 s)")
    parser.add_argument("--warmstart-steps", type=int, default=None,
                        help="cap on expert behaviour-cloning steps (default: the recipe's; 0 with "
                        "--warmstart-noisy-steps 0 = no warm start: a random model)")  # fmt: skip
    parser.add_argument("--warmstart-noisy-steps", type=int, default=None, help="steps on the noisy demonstrator")
    parser.add_argument("--warmstart-noise", type=float, default=None,
                        help="share of the noisy demonstrator's turns that are a random admissible action")  # fmt: skip
    parser.add_argument("--algo", default=None, help="the method (default: the recipe's, epo); the study's baselines")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="--llm: skip evaluating the pretrained model before the warm start")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the warm start, RL and evaluation")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks per split (default 64; 8)")
    parser.add_argument("--eval-temperature", type=float, default=1.0, help="sampling temperature of evaluation")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--rollout-mode", choices=("trajectory", "step"), default=None,
                        help="one row per episode (the recipe's) or one row per turn")  # fmt: skip
    return parser.parse_args(argv)


def demo_overrides(opts: argparse.Namespace) -> dict:
    """The recipe values the demo's flags replace (as `epo-trl train` flags would)."""
    quick = (QUICK_LLM if opts.llm else QUICK) if opts.quick else {}
    out = {"output_dir": opts.output_dir or ("runs/demo-llm" if opts.llm else "runs/demo"), "seed": opts.seed, **quick}
    for key in ("algo", "max_steps", "warmstart_steps", "warmstart_noisy_steps", "warmstart_noise", "learning_rate",
                "rollout_mode"):  # fmt: skip
        if getattr(opts, key) is not None:
            out[key] = getattr(opts, key)
    return out


def _last(history: list[dict], prefix: str) -> dict[str, float]:
    """The last logged value of every metric whose name starts with `prefix`."""
    values: dict[str, float] = {}
    for entry in history:
        values.update({k: v for k, v in entry.items() if k.startswith(prefix)})
    return values


def _mean(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return sum(values) / len(values) if values else None


def held_out_success(trainer, rollout, mode: str, tasks: int, temperature: float, seed: int) -> dict:
    """Held-out success of the trainer's current weights: on its vLLM engine when it has one (weights pushed first:
    the engine last saw the weights of the last rollout, not the last optimizer step), else HF generate."""
    from ..rollout.backends import backend_for_trainer
    from ..rollout.evaluation import HELD_OUT_SPLITS, evaluate, held_out

    factory, tokenizer = trainer.rollout_func.factory, trainer.processing_class
    if not trainer.use_vllm:
        return held_out(trainer.model, tokenizer, factory, rollout, tasks, temperature, seed, mode)
    trainer.vllm_generation.sync_weights()
    backend = backend_for_trainer(trainer)
    return {
        split: evaluate(
            backend,
            factory,
            factory.tasks(split)[:tasks],
            tokenizer,
            rollout,
            mode=mode,
            progress=False,
            temperature=temperature,
        )[0]
        for split in HELD_OUT_SPLITS
    }


# Episodes per task of each reference policy: more than the model's one, so their rates carry little noise.
REFERENCE_SAMPLES = 8


def reference_policies(factory, tasks: int, max_turns: int, seed: int) -> dict:
    """Random, walker and expert success and the ceiling on the first `tasks` tasks of each held-out split."""
    from ..rollout.baselines import baselines
    from ..rollout.evaluation import HELD_OUT_SPLITS

    return {
        split: baselines(factory, factory.tasks(split)[:tasks], max_turns, REFERENCE_SAMPLES, seed)
        for split in HELD_OUT_SPLITS
    }


def best_non_expert(reference: dict) -> tuple[str, float]:
    """The strongest reference policy that does not know the answer: (name, success)."""
    return max(((k, v) for k, v in reference.items() if k not in ("expert", "ceiling")), key=lambda kv: kv[1])


def zero_shot_success(trainer, base: str, evaluate) -> dict:
    """`evaluate()` with the pretrained model's weights (before the warm start) loaded into the trainer's model,
    restored after: one engine serves all three evaluations."""
    from transformers import AutoModelForCausalLM

    model = trainer.model
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(base, torch_dtype=model.dtype).state_dict())
    try:
        return evaluate()
    finally:
        model.load_state_dict(trained)


def main(argv: list[str] | None = None) -> int:
    from .runlock import release_all

    try:
        return _main(argv)
    finally:
        release_all()  # the run folder's lock (epo_trl.cli.runlock)


def _say(line: str) -> None:
    print(line, flush=True)  # flushed: a piped console (tee, a log file) shows the warm start as it goes


def _main(argv: list[str] | None) -> int:
    opts = _parse(list(argv or []))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..trainers.registry import get_method
    from .console import use_console
    from .lifecycle import phase
    from .plots import write_run_plots
    from .runlock import lock_output_dir
    from .train import (
        DEMO_LLM_RECIPE,
        DEMO_RECIPE,
        TINY_MODEL,
        WARM_START_FILE,
        base_model,
        build_trainer,
        describe,
        load_config,
        train_and_close,
    )

    recipe = DEMO_LLM_RECIPE if opts.llm else DEMO_RECIPE
    eval_tasks = opts.eval_tasks or (8 if opts.quick else 64)
    notes: list[str] = []
    script, rollout, args = load_config([str(recipe)], notes, overrides=demo_overrides(opts))
    print("\n".join(f"epo-trl demo: {line}" for line in [f"recipe {recipe.name}", *notes, *describe(script, args)]))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock_output_dir(args.output_dir, "epo-trl demo")  # one run per folder (epo_trl.cli.runlock)
    started = time.perf_counter()
    trainer = build_trainer(script, rollout, args, log=_say)  # builds (tiny) and warm-starts the model
    warm_seconds = time.perf_counter() - started
    tiny = script.model_name_or_path == TINY_MODEL
    warm_file = Path(trainer.model.name_or_path) / WARM_START_FILE
    warm = json.loads(warm_file.read_text()) if warm_file.exists() else {"steps": 0, "noisy_steps": 0}
    use_console(trainer)

    def evaluate() -> dict:
        return held_out_success(trainer, rollout, script.rollout_mode, eval_tasks, opts.eval_temperature, opts.seed)

    # A random tiny model has no zero-shot worth measuring; a pretrained one does (SmolLM2: 0, it ignores the format)
    skip = tiny or opts.no_zero_shot or not script.warm_starts
    model = trainer.model.name_or_path
    kept = f"the model {model} is kept; the demo saves no checkpoint, so nothing of the RL run is"
    with phase("evaluating the model before RL", kept):
        zero_shot = None if skip else zero_shot_success(trainer, base_model(script), evaluate)
        before = evaluate()
    with phase(f"RL training ({args.max_steps} steps)", kept):
        _, train_seconds = train_and_close(trainer)
    with phase("evaluating the model after RL", kept):
        after = evaluate()
    reference = reference_policies(trainer.rollout_func.factory, eval_tasks, rollout.max_turns, opts.seed)

    history = trainer.state.log_history
    train_logs = [h for h in history if "rollout/success_rate" in h]
    quarter = max(len(train_logs) // 4, 1)
    turn_entropy = {k.rsplit("/", 1)[-1]: v for k, v in _last(history, "epo/turn_entropy/").items()}
    method = get_method(script.algo)
    plots = write_run_plots(history, str(out / "plots"), *(method.entropy_band(args) or (None, None)))
    metrics = {
        "seed": opts.seed,
        "algo": script.algo,
        "recipe": str(recipe.name),
        "model": f"tiny Qwen2 (hidden {script.tiny_hidden_size})" if tiny else script.model_name_or_path,
        "generation": "vLLM" if trainer.use_vllm else "HF generate",
        "max_steps": args.max_steps,
        "setting": {
            "rollout_mode": script.rollout_mode,
            "max_turns": rollout.max_turns,
            "warmstart_noise": script.warmstart_noise,
            "beta": args.beta,
            "scale_rewards": args.scale_rewards,
            "learning_rate": args.learning_rate,
            "bf16": args.bf16,
            "entropy_coef": args.entropy_coef,  # TRL's GRPOConfig field (0.0 for --algo grpo)
            "method": method.describe(args),  # the method's own settings (epo_trl.trainers.registry)
            "episodes_per_step": args.per_device_train_batch_size,
            "group": args.num_generations,
        },
        "warm_start": warm,
        "global_step": trainer.state.global_step,
        "warm_start_seconds": round(warm_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "eval_zero_shot": zero_shot,
        "eval_before": before,
        "eval_after": after,
        "gain": {s: after[s]["success_rate"] - before[s]["success_rate"] for s in before},
        # policies that learn nothing, on the same held-out tasks and turn limit (epo_trl.rollout.baselines)
        "baselines": reference,
        "env": {"name": script.env, **script.env_kwargs},
        "train_success_first_quarter": _mean(train_logs[:quarter], "rollout/success_rate"),
        "train_success_last_quarter": _mean(train_logs[-quarter:], "rollout/success_rate"),
        "train_first_step": {
            k: v for k, v in (train_logs or [{}])[0].items() if k.startswith(("rollout/", "entropy"))
        },
        "train_last_step": {
            k: v for k, v in (train_logs or [{}])[-1].items() if k.startswith(("rollout/", "entropy"))
        },
        "epo": _last(history, "epo/"),
        # vLLM runs: TRL's engine-vs-trainer log-prob gap and importance-sampling ratios (last step)
        "sampling": _last(history, "sampling/"),
        "entropy_per_turn": dict(sorted(turn_entropy.items(), key=lambda kv: int(kv[0]))),
        "plots": plots,
    }
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    _report(metrics, out)
    return 0


def _report(m: dict, out: Path) -> None:
    s, w = m["setting"], m["warm_start"]
    method = "".join(f"{line}; " for line in s["method"])
    how = "TRL SFTTrainer" if w.get("trainer") == "trl.SFTTrainer" else "behaviour-cloning"
    env = m["env"]
    parts = [
        env["name"],
        repr(env["task"]) if "task" in env else "",
        f"{env['size']}x{env['size']}" if "size" in env else "",
    ]
    what = " ".join(p for p in parts if p)
    print(
        f"\n=== {m['algo'].upper()} demo: {what}, {m['model']}, CPU, {m['generation']}, {s['rollout_mode']} mode ==="
    )
    print(
        f"setting: warm start {w['steps']} {how} steps on the expert, then {w['noisy_steps']} on a demonstrator that "
        f"takes a random admissible action {s['warmstart_noise']:.0%} of the time (the start knows the format but "
        f"wanders); KL anchor beta={s['beta']}; scale_rewards={s['scale_rewards']!r} (the +10 win, not the -0.1 "
        f"invalid-turn penalty, dominates advantages); {method}"
        f"{s['episodes_per_step']} episodes/step in groups of {s['group']}, lr {s['learning_rate']}, "
        f"max {s['max_turns']} turns; seed {m['seed']}"
    )
    print(
        f"steps: {m['global_step']}; warm start {m['warm_start_seconds']:.1f}s, RL training {m['train_seconds']:.1f}s, "
        f"total {m['total_seconds']:.1f}s"
    )
    if m["eval_zero_shot"] is not None:
        z = m["eval_zero_shot"]["valid_seen"]
        print(
            f"  zero-shot (before the warm start), valid_seen: success {z['success_rate']:.3f}, valid actions "
            f"{1 - z['invalid_rate']:.3f} ({z['episodes']} episodes)"
        )
    size = env.get("size")
    splits = {"valid_seen": f"{size}x{size} mazes, none in train" if size else "held out from train",
              "valid_unseen": f"{size + 1}x{size + 1} mazes, a size never trained on" if size else "held out"}  # fmt: skip
    print("held-out success, unseen by content (the warm start = before RL; reference policies learn nothing):")
    for split, what in splits.items():
        b, a, ref = m["eval_before"][split], m["eval_after"][split], m["baselines"][split]
        name, best = best_non_expert(ref)
        print(
            f"{split:>12} ({what}): before RL {b['success_rate']:.3f} -> after {a['success_rate']:.3f} "
            f"({a['success_rate'] - b['success_rate']:+.3f} over the warm start, "
            f"{a['success_rate'] - best:+.3f} over the {name}; {a['episodes']} episodes); random "
            f"{ref['random']:.3f}, walker {ref['walker']:.3f}, expert {ref.get('expert', float('nan')):.3f}, "
            f"ceiling {ref.get('ceiling', float('nan')):.3f}; valid actions {1 - b['invalid_rate']:.3f} -> "
            f"{1 - a['invalid_rate']:.3f}"
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
