"""Multi-process helpers: work that one process does while the others wait."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build and load models as plain, unsharded modules inside the block, even under DeepSpeed ZeRO-3.

    Under an accelerate ZeRO-3 config, `TrainingArguments` registers a global DeepSpeed config with transformers
    (a weak reference read by `is_deepspeed_zero3_enabled()`), and every `from_pretrained` then enters
    `deepspeed.zero.Init`, whose parameter partitioning is a collective call of all ranks. Unregistering it here
    is what accelerate's `DeepSpeedPlugin.zero3_init_context_manager(enable=False)` does, without needing the plugin.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


@contextmanager
def on_main_process_first() -> Iterator[None]:
    """accelerate's `main_process_first()` for work the main process does alone (e.g. building and warm-starting a
    model that the others then load): ZeRO-3 init is off inside, since its collectives would wait forever for the
    ranks held at the barrier."""
    from accelerate import PartialState

    with PartialState().main_process_first(), zero3_init_disabled():
        yield


# A barrier at exit waits this long for the other ranks (seconds): long enough for rank 0 to finish writing a
# run's outputs, short enough that a rank whose peer died does not hang the launch until the group's timeout.
EXIT_BARRIER_TIMEOUT_S = 120.0
_exit_hook: dict[str, bool] = {"registered": False, "uncaught": False}


def destroy_process_group(barrier_timeout_s: float | None = None) -> None:
    """Tear the process group down before the interpreter does: left to finalization, gloo's worker threads can
    abort the process (`terminate called without an active exception`, SIGABRT) after a run that succeeded.

    A barrier first, so no rank leaves while another still sends: call it on paths every rank reaches, or pass
    `barrier_timeout_s` (gloo's monitored barrier) where a rank may be gone; a failed or timed-out barrier still
    tears down. Idempotent: a second call finds no group."""
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: no group to tear down (and no torch import)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import gc

    gc.collect()  # a finished trainer's cycles may hold gloo work objects: freed now, while the group is alive
    try:
        if barrier_timeout_s is None:
            dist.barrier()
        elif dist.get_backend() == "gloo":
            from datetime import timedelta

            dist.monitored_barrier(timeout=timedelta(seconds=barrier_timeout_s), wait_all_ranks=True)
    except Exception as e:  # a peer that died or never came: tear down this rank's side anyway
        print(f"epo-trl: exit barrier skipped ({type(e).__name__}); tearing down this rank's process group",
              file=sys.stderr)  # fmt: skip
    vllm_state = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_state is not None:  # a colocated engine's groups hang off the default group: they go first, or
        vllm_state.destroy_model_parallel()  # vLLM's atexit shutdown finds them dangling and raises
        vllm_state.destroy_distributed_environment()  # (ValueError: Invalid process group specified)
    if dist.is_initialized():  # vLLM's teardown may have destroyed the default group itself
        dist.destroy_process_group()


def end_launched_process(code: int) -> int:
    """The end of an `epo-trl` command: under a multi-process launch (WORLD_SIZE > 1, torch.distributed in use), run
    the exit handlers now and end the process without interpreter finalization, returning nothing.

    Why: even after `destroy_process_group`, objects of DeepSpeed or gloo (work handles holding tensors) can
    outlive the group and be destroyed during finalization, when their C++ threads can no longer take the GIL:
    `terminate called without an active exception`, SIGABRT, after a run that finished (a rare, timing-dependent
    abort under ZeRO-3). The command owns its process, so it can skip that stage; the exit handlers (logging, vLLM,
    TensorBoard/W&B writers) still run first. A single process returns `code` for a normal exit."""
    import os
    import sys

    launched = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # a launcher's rank
    if not launched or "torch.distributed" not in sys.modules:
        return code
    import atexit
    import logging

    destroy_process_group(barrier_timeout_s=EXIT_BARRIER_TIMEOUT_S)
    atexit._run_exitfuncs()  # CPython's own exit stage, run while the interpreter is whole
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def teardown_at_exit() -> None:
    """Register (once per process) an exit hook that tears down the process group, for every script that builds a
    trainer (a user's under `accelerate launch`, `epo-trl eval`, tests): the library set the group up, so the
    library takes it down. After an uncaught exception the hook skips the barrier: the other ranks are inside a
    collective that will never complete, and the launcher ends them once this rank is gone."""
    import atexit
    import sys

    if _exit_hook["registered"]:
        return
    _exit_hook["registered"] = True
    previous = sys.excepthook

    def note_uncaught(*exc_info):
        _exit_hook["uncaught"] = True
        previous(*exc_info)

    sys.excepthook = note_uncaught

    @atexit.register
    def _teardown() -> None:
        if _exit_hook["uncaught"]:
            dist = sys.modules.get("torch.distributed")
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            return
        destroy_process_group(barrier_timeout_s=EXIT_BARRIER_TIMEOUT_S)


def vllm_parallelism(
    num_heads: int, num_kv_heads: int, gpus: int, intermediate_size: int | None = None
) -> tuple[int, int]:
    """(tensor_parallel_size, data_parallel_size) for a vLLM server on `gpus` GPUs.

    vLLM splits attention heads evenly over tensor-parallel ranks: TP must divide the head count and the MLP width,
    and either divide the KV-head count or be a multiple of it (KV heads are then replicated). Qwen2.5-7B (28 heads,
    4 KV heads) cannot use TP 8; it gets TP 4 x 2 replicas. The largest valid TP is chosen (the least memory per
    GPU); the node's remaining GPUs serve as data-parallel replicas.
    """
    for tp in range(gpus, 0, -1):
        kv_ok = num_kv_heads % tp == 0 if num_kv_heads >= tp else tp % num_kv_heads == 0
        if gpus % tp == 0 and num_heads % tp == 0 and kv_ok and (intermediate_size or 0) % tp == 0:
            return tp, gpus // tp
    raise AssertionError("unreachable: TP 1 always fits")


def model_vllm_parallelism(model: str, gpus: int) -> tuple[int, int]:
    """`vllm_parallelism` for a model path or hub id, read from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return vllm_parallelism(heads, kv_heads, gpus, getattr(config, "intermediate_size", None))


if __name__ == "__main__":  # `python epo_trl/distributed.py MODEL GPUS` prints "TP DP", without importing trl
    import sys

    print(*model_vllm_parallelism(sys.argv[1], int(sys.argv[2])))
