"""The names epo_trl reads, writes or overrides in TRL, transformers, accelerate and vLLM beyond their public APIs.

One place for the version-fragile surface: private attributes and methods, the instance attributes TRL's
`GRPOTrainer.__init__` sets from its config, module internals, and the shapes we unpack. `tests/test_trl_surface.py`
checks every entry against the installed libraries (the failure names the library, the owner and the name) and that
the code uses no TRL name missing from this list; the pinned versions are in pyproject.toml.

Rules for the code that uses them:
- read them directly (`trainer.scale_rewards`), never `getattr(obj, "name", default)`: a rename upstream must raise
  an AttributeError naming the attribute, not silently turn a feature off;
- a new private or TRL-internal name goes here first, with the files that use it (the test checks both ways).

This module imports none of those libraries: `problems()` imports what it checks, when called.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re

# Owners (module:qualname). Instance attributes of a trainer are checked on a real GRPOTrainer-derived trainer.
GRPO_TRAINER = "trl.trainer.grpo_trainer:GRPOTrainer"
GRPO_CONFIG = "trl.trainer.grpo_config:GRPOConfig"
VLLM_GENERATION = "trl.generation.vllm_generation:VLLMGeneration"
HF_TRAINER = "transformers.trainer:Trainer"
TRAINING_ARGS = "transformers.training_args:TrainingArguments"
TRAINER_STATE = "transformers.trainer_callback:TrainerState"
PRETRAINED_CONFIG = "transformers.configuration_utils:PretrainedConfig"
DYNAMIC_CACHE = "transformers.cache_utils:DynamicCache"
GRADIENT_STATE = "accelerate.state:GradientState"
ACCELERATOR = "accelerate.accelerator:Accelerator"
LLM = "vllm.entrypoints.llm:LLM"
LLM_ENGINE = "vllm.v1.engine.llm_engine:LLMEngine"
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor:UniProcExecutor"
CPU_WORKER = "vllm.v1.worker.cpu_worker:CPUWorker"
CPU_MODEL_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
UNQUANTIZED_LINEAR = "vllm.model_executor.layers.linear:UnquantizedLinearMethod"
CURRENT_PLATFORM = "vllm.platforms:current_platform"
VLLM_CLIENT = "trl.generation.vllm_client:VLLMClient"
WEIGHT_TRANSFER_ENGINE = "vllm.distributed.weight_transfer.base:WeightTransferEngine"
LINEAR_LAYERS = "vllm.model_executor.layers.linear"
EMBEDDING_LAYERS = "vllm.model_executor.layers.vocab_parallel_embedding"

# How a name is checked.
INSTANCE = "instance attribute"  # present on a built trainer (or on `instance` handed to `problems`)
ASSIGNED = "attribute assigned in source"  # `self.<name> =` in the owner's source: set only in some modes
CLASS = "class attribute"  # methods, properties, constants: getattr(owner class, name)
FIELD = "config field"  # a dataclass field of the owner
MODULE = "module attribute"  # getattr(module, name)
CACHED = "cached_property"  # a functools.cached_property on the owner class (we write its instance slot)
PARAMETER = "parameter"  # `name` is a parameter of the owner callable
RETURNS = "return tuple"  # every `return` of owner.name returns exactly `returns`, in that order


@dataclasses.dataclass(frozen=True)
class Name:
    library: str  # "trl", "transformers", "accelerate" or "vllm"
    owner: str  # "module:qualname", or "module" for module attributes
    name: str
    kind: str
    used_in: tuple[str, ...]  # files that use it, relative to epo_trl/ (research/ is ../research)
    returns: tuple[str, ...] = ()  # RETURNS only: the unpacked names, in order
    requires: str = ""  # another library the name only exists with (TRL's vLLM re-exports need vllm)


def _names(library: str, owner: str, kind: str, uses: dict[str, str], requires: str = "") -> list[Name]:
    """Entries from `{name: "file, file"}` (paths relative to epo_trl/)."""
    return [
        Name(library, owner, name, kind, tuple(f"epo_trl/{p.strip()}" for p in files.split(",")), requires=requires)
        for name, files in uses.items()
    ]


GRPO = "trainers/grpo/grpo_trainer.py"
STEP = "trainers/grpo/step_batch.py"
AEPO = "trainers/aepo/aepo_trainer.py"
RESAMPLE = "trainers/grpo/resampling.py"
EPO = "trainers/epo/epo_trainer.py"
SYNC = "trainers/vllm_sync.py"
SERVERS = "trainers/vllm_servers.py"
PREFIX = "trainers/grpo/prefix_forward.py"
GLOO = "trainers/vllm_gloo.py"
FINGERPRINT = "trainers/weight_fingerprint.py"
CLI_SERVE = "cli/vllm_serve.py"
HF = "rollout/backends/hf.py"
VLLM_BACKEND = "rollout/backends/vllm.py"

SURFACE: tuple[Name, ...] = (
    # --- TRL GRPOTrainer: instance attributes set in __init__ (from GRPOConfig) -----------------------------
    *_names(
        "trl",
        GRPO_TRAINER,
        INSTANCE,
        {
            "_metrics": f"{GRPO}, {STEP}, {RESAMPLE}, {SYNC}, rollout/engine.py",
            "_last_world_entropy": GRPO,  # TRL's adaptive entropy controller's last measured entropy
            "_tokenizer": AEPO,
            "_pending_metrics": RESAMPLE,  # swapped out while a method samples more (sample_more)
            "_pending_extra_logs": RESAMPLE,
            "_standalone_tools": RESAMPLE,
            "_multi_environment": RESAMPLE,
            "environments": RESAMPLE,  # swapped while a method samples more
            "environment_factories": RESAMPLE,
            "tools": RESAMPLE,
            "rollout_func": f"{GRPO}, {RESAMPLE}, cli/train.py, cli/demo.py, ../research/bench/trainer_floor.py",
            "use_vllm": f"{GRPO}, {STEP}, {RESAMPLE}, {SYNC}, {SERVERS}, rollout/backends/__init__.py, cli/demo.py",
            "loss_type": GRPO,
            "beta": STEP,
            "num_iterations": f"{GRPO}, {STEP}",
            "num_generations": f"{STEP}, {RESAMPLE}",  # swapped while a method samples more
            "num_generations_eval": STEP,
            "temperature": f"{RESAMPLE}, {HF}, rollout/engine.py",  # swapped while a method samples more
            "top_p": HF,
            "top_k": HF,
            "eos_token_ids": f"{STEP}, {AEPO}, {HF}, {VLLM_BACKEND}",
            "pad_to_multiple_of": STEP,
            "scale_rewards": STEP,
            "mask_truncated_completions": f"{STEP}, {AEPO}",
            "vllm_importance_sampling_correction": f"{GRPO}, {STEP}",
            "vllm_importance_sampling_mode": STEP,
            "vllm_importance_sampling_clip_min": STEP,
            "vllm_importance_sampling_clip_max": STEP,
            "entropy_coef": GRPO,
            "use_adaptive_entropy": GRPO,
            "top_entropy_quantile": GRPO,
            "ref_model": STEP,
            "reward_weights": RESAMPLE,
        },
    ),
    # Set only in some modes (checked in TRL's source): vLLM on / off, after a generation with tools / envs.
    *_names(
        "trl",
        GRPO_TRAINER,
        ASSIGNED,
        {
            "vllm_generation": f"{GRPO}, {RESAMPLE}, {SYNC}, {SERVERS}, {VLLM_BACKEND}, cli/demo.py",  # use_vllm only
            "_last_loaded_step": GRPO,  # use_vllm only: the step whose weights vLLM holds
            "generation_config": RESAMPLE,  # HF generate only; its temperature swapped by sample_more
            "generation_kwargs": f"{RESAMPLE}, {HF}",  # HF generate only
            "_batch_environments": RESAMPLE,  # environment_factory: set per generation batch, swapped by sample_more
            "_sync_tool_dicts": RESAMPLE,  # tools: set per generation batch, swapped by sample_more
            "_async_tool_dicts": RESAMPLE,
        },
    ),
    # --- TRL GRPOTrainer: methods epo_trl overrides or calls ---------------------------------------------------
    *_names(
        "trl",
        GRPO_TRAINER,
        CLASS,
        {
            "_generate_and_score_completions": f"{GRPO}, ../research/bench/tool_race.py",  # overridden: step rows, the on_generation hook
            "_prepare_inputs": GRPO,  # overridden: prepared micro-batches pass through
            "training_step": GRPO,  # overridden: row chunks
            "_compute_loss": f"{GRPO}, ../research/bench/loss_overhead.py",  # overridden: the method's terms; timed
            # overridden and called (policy_logps); timed by the trainer_floor benchmark
            "_get_per_token_logps_and_entropies": f"{GRPO}, {STEP}, ../research/bench/trainer_floor.py",
            "_load_optimizer_and_scheduler": GRPO,  # overridden: the method's state
            "_save_checkpoint": GRPO,  # overridden: crash-safe order
            "_calculate_rewards": RESAMPLE,
            "_generate_single_turn": "../research/bench/tool_race.py",  # replaced by a scripted generator in the benchmark
            "get_high_entropy_mask": GRPO,
        },
    ),
    Name(
        "trl",
        GRPO_TRAINER,
        "_generate",
        RETURNS,
        (f"epo_trl/{RESAMPLE}", f"epo_trl/{GRPO}"),  # GRPO overrides it: TRL's old-logp pass follows it
        returns=(
            "prompt_ids",
            "completion_ids",
            "tool_mask",
            "completions",
            "logprobs",
            "extra_fields",
            "images",
            "tool_images",
        ),
    ),
    # --- TRL GRPOConfig fields read through trainer.args ------------------------------------------------------
    *_names(
        "trl",
        GRPO_CONFIG,
        FIELD,
        {
            "steps_per_generation": f"{GRPO}, {STEP}",
            "entropy_target": GRPO,
            "ds3_gather_for_generation": HF,
            "vllm_enable_sleep_mode": VLLM_BACKEND,
            "vllm_mode": f"{GRPO}, {SERVERS}",
            "vllm_group_port": SERVERS,
            "vllm_server_timeout": SERVERS,
            "loss_type": GRPO,  # its allowed values: tests/test_trl_surface.py reads them from the field's help
        },
    ),
    # --- TRL VLLMGeneration (trainer.vllm_generation): built only with vLLM, checked in its source ------------
    *_names(
        "trl",
        VLLM_GENERATION,
        ASSIGNED,
        {
            "llm": f"{SYNC}",  # colocate mode
            "vllm_client": f"{SYNC}, {SERVERS}",  # server mode; replaced by a ServerPool
            "mode": SYNC,
            "enable_sleep_mode": SYNC,
            "temperature": f"{RESAMPLE}, {VLLM_BACKEND}",  # swapped for a call
            "max_completion_length": VLLM_BACKEND,  # swapped for a call
        },
    ),
    *_names(
        "trl",
        VLLM_GENERATION,
        CLASS,
        {
            "sync_weights": f"{GRPO}, {SYNC}, cli/demo.py",  # wrapped by vllm_sync.install
            "generate": VLLM_BACKEND,
            "_iter_named_params": SYNC,  # every tensor, in vLLM's names, for the CPU reload
        },
    ),
    *_names(
        "trl",
        "trl.generation.vllm_generation",
        MODULE,
        {
            "LLM": VLLM_BACKEND,  # replaced around GRPOTrainer.__init__ (CPU dtype, one-process group)
            "SamplingParams": SYNC,
        },
        requires="vllm",
    ),
    *_names("trl", "trl.generation.vllm_generation", MODULE, {"VLLMClient": SERVERS}),  # replaced by ServerClient
    # --- TRL VLLMClient: ServerClient subclasses it (the gloo backend, errors that name the server) -------------
    *_names("trl", "trl.generation.vllm_client", MODULE, {"VLLMClient": SERVERS}),
    *_names(
        "trl",
        VLLM_CLIENT,
        CLASS,
        {
            "_get": SERVERS,
            "_post": SERVERS,
            "_start_weight_update": SERVERS,
            "_finish_weight_update": SERVERS,
            "get_server_info": f"{SERVERS}, {SYNC}",  # the sync check reads the server's dtype
            "get_world_size": SERVERS,
            "init_communicator": SERVERS,
            "update_named_params": SERVERS,
            "close_communicator": SERVERS,
        },
    ),
    *_names(
        "trl",
        VLLM_CLIENT,
        ASSIGNED,
        {
            "session": SERVERS,
            "base_url": SERVERS,
            "group_port": SERVERS,
            "_updating_weights": SERVERS,
            "model": SERVERS,
        },
    ),
    *_names("trl", "trl.scripts.vllm_serve", MODULE, {"build_command": CLI_SERVE, "make_parser": CLI_SERVE}),
    *_names(
        "trl",
        "trl.trainer.utils",
        MODULE,
        {"pad": f"{STEP}, {AEPO}", "nanstd": STEP, "nanmax": STEP, "nanmin": STEP, "use_adapter": STEP},
    ),
    *_names("trl", "trl.models.utils", MODULE, {"disable_gradient_checkpointing": STEP}),
    *_names("trl", "trl.models", MODULE, {"unwrap_model_for_generation": HF}),
    *_names("trl", "trl.extras.profiling", MODULE, {"profiling_context": GRPO}),
    # --- transformers -------------------------------------------------------------------------------------------
    *_names("transformers", HF_TRAINER, CLASS, {"_get_output_dir": GRPO}),
    *_names(
        "transformers",
        HF_TRAINER,
        ASSIGNED,
        {
            "current_gradient_accumulation_steps": f"{GRPO}, {AEPO}",  # set by train()
            "model_wrapped": HF,
        },
    ),
    # A cached_property: its instance slot (`args.__dict__["_setup_devices"]`) is replaced while the optimizer loads.
    *_names("transformers", TRAINING_ARGS, CACHED, {"_setup_devices": GRPO}),
    *_names("transformers", TRAINER_STATE, CLASS, {"save_to_json": GRPO}),  # shadowed on the instance: atomic
    *_names("transformers", "transformers.trainer_utils", MODULE, {"PREFIX_CHECKPOINT_DIR": GRPO}),
    *_names(
        "transformers",
        "transformers.integrations.deepspeed",
        MODULE,
        {
            "_hf_deepspeed_config_weak_ref": "distributed.py",  # the ZeRO-3 config every from_pretrained consults
            "set_hf_deepspeed_config": "distributed.py",
            "unset_hf_deepspeed_config": "distributed.py",
        },
    ),
    *_names("transformers", PRETRAINED_CONFIG, ASSIGNED, {"_name_or_path": GRPO}),
    *_names("transformers", DYNAMIC_CACHE, PARAMETER, {"ddp_cache_data": "rollout/backends/hf_kv_cache.py"}),
    # --- shared-prefix forwards: TRL's fused LM head over a cache that transformers' layers read and extend ---------
    # what `model(..., labels=..., fused_lm_head=True)` returns (trl.trainer.utils.add_fused_lm_head)
    *_names("trl", "trl.trainer.utils:FusedCausalLMOutput", FIELD, {"log_probs": PREFIX, "entropy": PREFIX}),
    *_names("transformers", "transformers.cache_utils", MODULE, {"DynamicLayer": PREFIX}),
    *_names(
        "transformers",
        "transformers.cache_utils:DynamicLayer",
        CLASS,
        {"update": PREFIX, "lazy_initialization": PREFIX},
    ),  # fmt: skip
    *_names("transformers", "transformers.cache_utils:DynamicLayer", ASSIGNED, {"keys": PREFIX, "values": PREFIX}),
    *_names("transformers", "transformers.cache_utils:CacheLayerMixin", ASSIGNED, {"is_initialized": PREFIX}),
    *_names("transformers", "transformers.cache_utils:Cache", ASSIGNED, {"layers": PREFIX}),
    *_names("transformers", "transformers.cache_utils:Cache", ASSIGNED, {"layer_class_to_replicate": PREFIX}),
    *_names("transformers", "transformers.modeling_layers", MODULE, {"GradientCheckpointingLayer": PREFIX}),
    *_names(
        "transformers",
        "transformers.modeling_layers:GradientCheckpointingLayer",
        CLASS,
        {"_can_checkpoint_with_cache": PREFIX, "gradient_checkpointing": PREFIX},
    ),  # fmt: skip
    # --- accelerate ----------------------------------------------------------------------------------------------
    *_names("accelerate", GRADIENT_STATE, CLASS, {"_set_sync_gradients": GRPO}),  # per row chunk
    *_names("accelerate", ACCELERATOR, ASSIGNED, {"gradient_state": GRPO}),
    # --- vLLM (colocated CPU engine: the RL weight reload) ------------------------------------------------------
    *_names("vllm", LLM, ASSIGNED, {"llm_engine": SYNC}),
    *_names("vllm", LLM, CLASS, {"reset_prefix_cache": SYNC, "generate": SYNC, "apply_model": SYNC}),
    *_names("vllm", LLM_ENGINE, ASSIGNED, {"model_executor": SYNC}),
    *_names("vllm", UNIPROC_EXECUTOR, ASSIGNED, {"driver_worker": SYNC}),
    *_names("vllm", CPU_WORKER, ASSIGNED, {"model_runner": f"{SYNC}, {FINGERPRINT}"}),
    *_names("vllm", CPU_MODEL_RUNNER, CLASS, {"reload_weights": SYNC, "get_model": f"{SYNC}, {FINGERPRINT}"}),
    *_names("vllm", UNQUANTIZED_LINEAR, CLASS, {"process_weights_after_loading": SYNC}),  # the tied LM head
    *_names("vllm", CURRENT_PLATFORM, CLASS, {"is_cpu": SYNC, "dist_backend": VLLM_BACKEND}),
    # --- vLLM (the sync check's weight fingerprints: layers applied through their own kernels) --------------------
    *_names("vllm", "vllm.distributed", MODULE, {"get_tensor_model_parallel_world_size": FINGERPRINT}),
    *_names("vllm", LINEAR_LAYERS, MODULE, {"LinearBase": FINGERPRINT, "UnquantizedLinearMethod": FINGERPRINT}),
    *_names(
        "vllm",
        f"{LINEAR_LAYERS}:LinearBase",
        ASSIGNED,
        {"input_size": FINGERPRINT, "params_dtype": FINGERPRINT, "quant_method": FINGERPRINT},
    ),  # fmt: skip
    *_names(
        "vllm", EMBEDDING_LAYERS, MODULE, {"ParallelLMHead": FINGERPRINT, "UnquantizedEmbeddingMethod": FINGERPRINT}
    ),
    *_names(
        "vllm",
        f"{EMBEDDING_LAYERS}:VocabParallelEmbedding",
        ASSIGNED,
        {"embedding_dim": FINGERPRINT, "params_dtype": FINGERPRINT, "quant_method": FINGERPRINT},
    ),  # fmt: skip
    *_names("vllm", UNQUANTIZED_LINEAR, CLASS, {"apply": FINGERPRINT}),
    *_names("vllm", f"{EMBEDDING_LAYERS}:UnquantizedEmbeddingMethod", CLASS, {"apply": FINGERPRINT}),
    # --- vLLM (servers: the gloo weight-transfer engine, a `vllm.general_plugins` entry point) ------------------
    *_names(
        "vllm",
        "vllm.distributed.weight_transfer.factory:WeightTransferEngineFactory",
        CLASS,
        {"register_engine": GLOO},
    ),  # fmt: skip
    *_names(
        "vllm",
        WEIGHT_TRANSFER_ENGINE,
        CLASS,
        {"parse_update_info": GLOO, "update_weights": GLOO},
    ),  # fmt: skip
    *_names("vllm", WEIGHT_TRANSFER_ENGINE, ASSIGNED, {"parallel_config": GLOO, "model_config": GLOO, "model": GLOO}),
    *_names(
        "vllm",
        "vllm.model_executor.model_loader.reload",
        MODULE,
        {"initialize_layerwise_reload": GLOO, "finalize_layerwise_reload": GLOO},
    ),  # fmt: skip
    *_names(
        "vllm", "vllm.model_executor.model_loader.mtp_validation", MODULE, {"disable_mtp_completeness_check": GLOO}
    ),  # fmt: skip
)


# TRL's per-batch tool state that `sample_more` replaces and restores (GRPOTrainer._generate_and_score_completions).
TOOL_BATCH_STATE = ("environments", "_batch_environments", "_sync_tool_dicts", "_async_tool_dicts")


# --- checking -------------------------------------------------------------------------------------------------------
def resolve(owner: str):
    """The object `owner` ("module:qualname" or "module") names; raises ImportError / AttributeError."""
    module_name, _, qualname = owner.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


@functools.cache
def _class_source(cls) -> str:
    """The source of `cls` and its bases (those with source), concatenated."""
    parts = []
    for klass in inspect.getmro(cls if inspect.isclass(cls) else type(cls)):
        try:
            parts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


def assigned_in_source(cls, name: str) -> bool:
    return re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)", _class_source(cls)) is not None


def returned_tuples(func) -> list[tuple[str, ...]]:
    """The names of every `return a, b, ...` in `func`'s own body (nested functions excluded)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    out = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not top:
                continue
            if isinstance(child, ast.Return) and child.value is not None:
                elts = child.value.elts if isinstance(child.value, ast.Tuple) else [child.value]
                out.append(tuple(ast.unparse(e) for e in elts))
            visit(child, False)

    visit(tree.body[0], False)
    return out


def missing(entry: Name, instance=None) -> str | None:
    """Why `entry` does not hold in the installed library, or None when it does."""
    where = ", ".join(entry.used_in)
    lead = f"{entry.library}: {entry.owner} has no {entry.kind} `{entry.name}` (epo_trl uses it in {where})"
    try:
        owner = resolve(entry.owner)
    except (ImportError, AttributeError) as e:
        return f"{entry.library}: cannot resolve {entry.owner} ({e}); epo_trl uses its `{entry.name}` in {where}"
    if entry.kind == INSTANCE:
        ok = hasattr(instance, entry.name) if instance is not None else assigned_in_source(owner, entry.name)
    elif entry.kind == ASSIGNED:
        ok = assigned_in_source(owner, entry.name)
    elif entry.kind == CLASS:
        ok = hasattr(owner, entry.name)
    elif entry.kind == FIELD:
        ok = entry.name in {f.name for f in dataclasses.fields(owner)}
    elif entry.kind == MODULE:
        ok = hasattr(owner, entry.name)
    elif entry.kind == CACHED:
        ok = isinstance(inspect.getattr_static(owner, entry.name, None), functools.cached_property)
    elif entry.kind == PARAMETER:
        ok = entry.name in inspect.signature(owner).parameters
    elif entry.kind == RETURNS:
        func = getattr(owner, entry.name, None)
        if func is None:
            return lead
        shapes = returned_tuples(func)
        ok = bool(shapes) and all(s == entry.returns for s in shapes)
        if not ok:
            return f"{entry.library}: {entry.owner}.{entry.name} returns {shapes}, epo_trl unpacks {entry.returns} ({where})"
    else:
        raise ValueError(f"unknown kind {entry.kind!r} for {entry.name}")
    return None if ok else lead


def problems(surface=SURFACE, instance=None, libraries=("trl", "transformers", "accelerate", "vllm")) -> list[str]:
    """Every entry of `surface` from `libraries` that the installed versions lack; instance attributes of the
    trainer are checked on `instance` (a built GRPOTrainer-derived trainer) when given, else on the class."""
    out = []
    for entry in surface:
        if entry.library in libraries and (not entry.requires or entry.requires in libraries):
            problem = missing(entry, instance if entry.owner == GRPO_TRAINER else None)
            if problem:
                out.append(problem)
    return out
