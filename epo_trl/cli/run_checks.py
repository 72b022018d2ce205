"""Checks of `epo-trl train` that compare the command line with what is already on disk, and numbers no run can use.

All run in `load_config`, before any file of output_dir is touched (logs.jsonl is cut on resume only after them)
and before the model is built, and each mistake is one `UsageError` naming both values and the fix:

- a resume under another method (`--algo`) or seed than the checkpoint's run (epo_state.json's "run" record,
  or its keys for older checkpoints), or with a model of another shape (the checkpoint's config.json);
- an output_dir whose `tiny-model/` (or `warm-start-model/`) was built with other `--tiny_hidden_size` /
  `--tiny_head_dim` / `--seed` than given: the folder is reused as is, so those flags would be ignored silently;
- a learning rate of 0, a float that is not finite (`--learning_rate inf`), seeds numpy refuses.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .errors import UsageError

TINY_FOLDER, WARM_FOLDER = "tiny-model", "warm-start-model"  # where resolve_model (cli/train.py) builds them
BUILD_RECORD = "epo_trl_build.json"  # in a model folder built in output_dir: {"seed": N, "model": base model}
MAX_SEED = 2**32 - 1  # numpy's (transformers.set_seed seeds numpy too)
# config.json fields that fix the shape of a model's weights: a checkpoint of another shape cannot be loaded.
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size")  # fmt: skip


def check_values(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Numbers that parse but no run can use: a non-finite float set in the file or on the command line, a
    learning rate of 0 (inf trains a NaN model in one step; 0 trains nothing), a seed numpy refuses (after the
    model and the warm start are built)."""
    from .parser import DEFAULT

    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value) and sources.get(key) != DEFAULT:
            raise UsageError(f"{key}={value} is not a finite number.", f"fix: pass a finite value for --{key}.")
    if values.get("learning_rate") == 0:  # < 0: the config's own check names it
        raise UsageError("learning_rate=0 trains nothing: it must be > 0.", "fix: e.g. --learning_rate 5e-4.")
    for key in ("seed", "data_seed"):
        value = values.get(key)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise UsageError(f"{key}={value} is not a seed: it must be in [0, {MAX_SEED}].", f"fix: e.g. --{key} 0.")


def read_config(folder: str) -> dict | None:
    """A model folder's config.json, or None when it is missing or not a JSON object."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def model_shape(config: dict) -> dict[str, Any]:
    shape = {k: config[k] for k in SHAPE_KEYS if config.get(k) is not None}
    if "head_dim" not in shape and config.get("hidden_size") and config.get("num_attention_heads"):
        shape["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return shape


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in SHAPE_KEYS if k in a and k in b and a[k] != b[k]]


def built_folder(values: dict[str, Any]) -> str | None:
    """The folder in output_dir that resolve_model reuses as this run's model when it exists (None: none)."""
    from .train import TINY_MODEL

    if values["model_name_or_path"] == TINY_MODEL:
        return os.path.join(values["output_dir"], TINY_FOLDER)
    if values.get("warmstart_steps") or values.get("warmstart_noisy_steps"):
        return os.path.join(values["output_dir"], WARM_FOLDER)
    return None


def reused_folder(values: dict[str, Any]) -> str | None:
    """`built_folder` when resolve_model will reuse it as it is (a finished build: train.model_built), else None."""
    from .train import model_built

    folder = built_folder(values)
    warm = bool(values.get("warmstart_steps") or values.get("warmstart_noisy_steps"))
    return folder if folder and model_built(folder, warm) else None


def folder_to_build(script, output_dir: str) -> str | None:
    """The model folder resolve_model is about to build in output_dir (None: it reuses one, or builds none)."""
    values = {**vars(script), "output_dir": output_dir}
    return built_folder(values) if reused_folder(values) is None else None


def record_build(folder: str | None, seed: int, main_process: bool = True, model: str | None = None) -> None:
    """Note the seed (and base model) a model folder of output_dir was just built and warm-started with, for
    `check_built_model`."""
    from ..trainers.checkpoints import atomic_write_json

    if folder and main_process and os.path.isfile(os.path.join(folder, "config.json")):
        atomic_write_json(os.path.join(folder, BUILD_RECORD), {"seed": seed, "model": model})


def check_built_model(values: dict[str, Any]) -> None:
    """An output_dir's `tiny-model/` (or `warm-start-model/`) is reused as is: flags that would have built it
    differently must agree with it, or they would be ignored without a word."""
    from .train import TINY_MODEL

    folder = reused_folder(values)
    config = read_config(folder) if folder else None
    if config is None:
        return  # built by this run (or damaged: resolve_model reports it)
    fresh = "a fresh --output_dir (or delete that folder to rebuild it)"
    if values["model_name_or_path"] == TINY_MODEL:
        built = {"tiny_hidden_size": config.get("hidden_size"), "tiny_head_dim": model_shape(config).get("head_dim")}
        wrong = [k for k, v in built.items() if v is not None and v != values[k]]
        if wrong:
            raise UsageError(
                f"output_dir={values['output_dir']!r} already holds {TINY_FOLDER}/ built with "
                + ", ".join(f"{k}={built[k]}" for k in wrong)
                + ", and this run asks for "
                + ", ".join(f"{k}={values[k]}" for k in wrong)
                + ": the folder is reused as is.",
                f"fix: pass {' '.join(f'--{k} {built[k]}' for k in wrong)}, or {fresh}.",
            )
    try:
        with open(os.path.join(folder, BUILD_RECORD), encoding="utf-8") as f:
            record = json.load(f)
        seed, model = record.get("seed"), record.get("model")
    except (OSError, ValueError, AttributeError):
        return  # built before the record existed: its seed is unknown
    if model is not None and model != values["model_name_or_path"]:
        raise UsageError(
            f"output_dir={values['output_dir']!r} already holds {os.path.basename(folder)}/, warm-started from "
            f"model_name_or_path={model!r}, and this run has model_name_or_path={values['model_name_or_path']!r}: "
            "the folder is reused as is.",
            f"fix: pass --model_name_or_path {model}, or {fresh}.",
        )
    if seed is not None and seed != values["seed"]:
        raise UsageError(
            f"output_dir={values['output_dir']!r} already holds {os.path.basename(folder)}/ built with seed={seed}, "
            f"and this run has seed={values['seed']}: the folder is reused as is, not rebuilt with seed "
            f"{values['seed']}.",
            f"fix: pass --seed {seed}, or {fresh}; to train that model with another seed, pass "
            f"--model_name_or_path {folder} with another --output_dir.",
        )


def check_resume_matches(values: dict[str, Any], checkpoint: str) -> None:
    """A checkpoint resumes only the run that wrote it: same method, seed and model shape."""
    from ..trainers.checkpoints import RUN, STATE_FILE, state_algo
    from .train import TINY_MODEL

    flag = f"resume_from_checkpoint={checkpoint!r}"
    fresh = f"or start a new run in a fresh --output_dir (not {values['output_dir']!r})"
    try:
        with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = None
    if isinstance(state, dict):
        algo = values["algo"]
        if algo in ("epo", "epo-base"):
            algo = "epo" if values.get("smoothing") else "epo-base"
        written = state_algo(state)
        recorded = isinstance(state.get(RUN), dict)
        same = written is None or written == algo or (not recorded and written == "epo" and algo == "epo-base")
        if not same:
            raise UsageError(
                f"{flag} was written with --algo {written} ({STATE_FILE}), and this run has --algo {algo}: the "
                "method's state would not carry over.",
                f"fix: resume with --algo {written}, {fresh}.",
            )
        seed = state[RUN].get("seed") if recorded else None
        if seed is not None and seed != values["seed"]:
            raise UsageError(
                f"{flag} was trained with seed={seed}, and this run has seed={values['seed']}: the resumed run would "
                "not continue that run.",
                f"fix: pass --seed {seed} (the checkpoint's), {fresh}.",
            )
    saved = read_config(checkpoint)
    if saved is None:
        return  # an adapter checkpoint, or no config: nothing to compare
    saved = model_shape(saved)
    name = values["model_name_or_path"]
    folder = reused_folder(values)
    ours = read_config(folder) if folder else None
    if ours is None and name == TINY_MODEL:
        ours, source = {"hidden_size": values["tiny_hidden_size"], "head_dim": values["tiny_head_dim"]}, "tiny"
    elif ours is None:
        ours, source = model_config_of(name), name
    else:
        source = folder
    if ours is None:
        return  # a hub id not in the cache, the smollm2 alias before its conversion: not known yet
    ours = model_shape(ours) if source != "tiny" else ours
    wrong = _differences(saved, ours)
    if not wrong:
        return
    theirs = ", ".join(f"{k}={saved[k]}" for k in wrong)
    if source == "tiny":
        mine = ", ".join(f"tiny_{k}={ours[k]}" for k in wrong)
        fix = f"fix: pass {' '.join(f'--tiny_{k} {saved[k]}' for k in wrong)} (the checkpoint's), {fresh}."
    else:
        mine = f"{source} has " + ", ".join(f"{k}={ours[k]}" for k in wrong)
        fix = f"fix: pass the model the checkpoint was trained from, {fresh}."
    raise UsageError(f"{flag} holds a model with {theirs}, and this run's model differs ({mine}).", fix)


def model_config_of(name: str) -> dict | None:
    """The config.json of a local model folder or a cached hub model (None when neither)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return read_config(path)
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library refuses: check_model_reference reports it
        return None
    return read_config(os.path.dirname(cached)) if isinstance(cached, str) else None
