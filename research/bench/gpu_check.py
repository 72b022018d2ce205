"""`make gpu-check` / `python -m research.bench.gpu_check`: the check a CUDA machine runs first (issue 37, item 6).

On one GPU, within a time budget (default 9 minutes), it runs four parts and writes ONE JSON file
(docs/gpu_check.json, beside the benchmarks' raw file) that `python -m research.bench` folds into
docs/benchmarks.md's "GPU (device)" section:

  epo_aepo        bf16 EPO and AEPO optimizer steps, step and trajectory mode, on the built-in maze, with a
                  random-init model of Qwen2.5-1.5B's shape (weights cannot travel; the shape sets the cost) and the
                  package's offline tokenizer (epo_trl.models.tiny, the maze's words whole, vocab padded to 151936)
  vllm_colocate   the same EPO steps with rollouts on a colocated vLLM engine (the GPU build), the weight-sync probe
                  (epo_trl.trainers.vllm_sync.SyncCheck) after every push
  zero2           EPO steps under DeepSpeed ZeRO-2 on one GPU (recipes/accelerate/zero2.yaml, 1 process)
  loss_overhead   the loss-overhead benchmark (research/bench/loss_overhead.py) on CUDA: bf16, Qwen2.5-0.5B's shape

Every part runs in a process of its own (a crash, a CUDA OOM or a hung engine there loses that part only; GPU memory
is free again for the next), is timed and judged pass / fail, and records its error instead of stopping the
others; the JSON is rewritten after each part. A part starts only if the budget has its minimum left, and is killed
when the budget runs out. Without CUDA it refuses (exit 2). `--dry-run` runs the same code on CPU with a tiny fp32
model of the same layout (vocab padded beyond the tokenizer, tied embeddings), skipping the parts that need CUDA
unless `--parts` names them (then vLLM's CPU build and DeepSpeed's CPU accelerator run them).

    python -m research.bench.gpu_check                       # on a GPU: docs/gpu_check.json
    python -m research.bench.gpu_check --dry-run             # on CPU: runs/gpu_check_dry_run.json, ~5 minutes
    python -m research.bench.gpu_check --dry-run --parts epo_aepo vllm_colocate zero2 loss_overhead   # all, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: children run `-m research.bench.gpu_check` from here
DEFAULT_OUTPUT = Path("docs/gpu_check.json")
DRY_RUN_OUTPUT = Path("runs/gpu_check_dry_run.json")  # never the committed file: dry-run numbers are not GPU numbers

PARTS = {
    "epo_aepo": "bf16 EPO and AEPO optimizer steps (step and trajectory mode), Qwen2.5-1.5B-shaped random model",
    "vllm_colocate": "EPO steps with a colocated vLLM engine, the weight-sync probe after every push",
    "zero2": "EPO steps under DeepSpeed ZeRO-2 on one GPU (accelerate, recipes/accelerate/zero2.yaml)",
    "loss_overhead": "the loss-overhead benchmark on CUDA (bf16, Qwen2.5-0.5B-shaped random model)",
}
# Seconds a part needs at least to be worth starting (on a GPU: engine start-up, model loads, a few steps; a dry run
# on a small CPU takes as long).
MIN_SECONDS = {"model": 30, "epo_aepo": 90, "vllm_colocate": 90, "zero2": 60, "loss_overhead": 60}
NEEDS_CUDA = {"vllm_colocate": "vLLM's GPU build", "zero2": "DeepSpeed on a GPU"}  # skipped in a dry run by default

# Qwen2.5-1.5B's shape (its config.json), built by hand: the weights cannot travel to a machine without network.
QWEN25_15B_SHAPE = {
    "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768,
}  # fmt: skip
# The dry run's: the same layout at toy size. head_dim 32 (vLLM's CPU attention refuses less); a vocab padded beyond
# the tokenizer's ~500 words, as 151936 is, so the out-of-tokenizer ids the random model samples are exercised too.
DRY_RUN_SHAPE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 128, "vocab_size": 4096, "tie_word_embeddings": True, "max_position_embeddings": 4096,
}  # fmt: skip

# A `key` maze a random model cannot finish: every episode lasts MAX_TURNS, so steps cost the same run to run.
MAZE = {"size": 6, "task": "key", "distractors": 1}
MAX_TURNS, TURN_TOKENS = 4, 16
RUNS = (("epo", "step"), ("epo", "trajectory"), ("aepo", "step"), ("aepo", "trajectory"))
METHOD_METRIC = {"epo": "epo/smooth_penalty", "aepo": "aepo/temperature"}  # logged every step by the method
LEARNING_RATE = 1e-5
VLLM_MEMORY = 0.3  # share of the GPU for the colocated engine; the trainer's fp32 states + AdamW take ~25 GB
VLLM_MAX_LEN = 4096  # prompt + trajectory; vLLM would otherwise size its KV cache for 32768 positions
LOG_TAIL = 3000  # characters of a failed part's log kept in the JSON


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m research.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU with a tiny fp32 model (parts needing CUDA are skipped unless --parts names them)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=None, help="default: all")
    parser.add_argument("--output", default=None,
                        help=f"the JSON written (default {DEFAULT_OUTPUT}; with --dry-run {DRY_RUN_OUTPUT})")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget in seconds: a part starts only with its minimum left, and is killed "
                        "when the budget runs out")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training run (>= 2)")
    parser.add_argument("--work-dir", default=None, help="keep the model, logs and run folders here (default: a "
                        "temporary folder, removed at the end)")  # fmt: skip
    parser.add_argument("--commit", default=None,
                        help="the commit of the code, recorded when this tree is no git checkout (a copy sent to a "
                        "GPU machine); a checkout's own commit wins")  # fmt: skip
    parser.add_argument("--child", choices=["model", *PARTS], help=argparse.SUPPRESS)  # one part, in its process
    opts = parser.parse_args(argv)
    if opts.steps < 2:
        parser.error(f"--steps {opts.steps}: at least 2 (the first step warms up; it is not timed in the summary)")
    if opts.budget_s <= 0:
        parser.error(f"--budget-s {opts.budget_s:g}: must be > 0")
    return opts


# ---------------------------------------------------------------------------------------------------- the parent


def refusal(dry_run: bool) -> str | None:
    """One line (what, why, fix) when this machine cannot run the check, else None."""
    missing = [m for m in ("torch", "transformers", "trl", "datasets", "accelerate") if not _installed(m)]
    if missing:
        return (f"gpu-check: {', '.join(missing)} not installed, which every part needs; fix: `make gpu-check` "
                "installs them (or pip install -e . in this Python).")  # fmt: skip
    import torch

    if not dry_run and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"gpu-check: no CUDA GPU is visible (torch {torch.__version__}, {build}), and this check measures "
                "on one; fix: run it on a CUDA machine (make gpu-check), or add --dry-run for the same code on CPU "
                "with a tiny fp32 model.")  # fmt: skip
    return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(sys.argv[1:] if argv is None else argv))
    from .common import setup_offline

    setup_offline()
    if opts.child:
        return _child(opts)
    line = refusal(opts.dry_run)
    if line:
        print(line, file=sys.stderr)
        return 2
    output = Path(opts.output or (DRY_RUN_OUTPUT if opts.dry_run else DEFAULT_OUTPUT))
    with contextlib.ExitStack() as stack:
        work = Path(opts.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        check(opts, work.resolve(), output)  # absolute: the parts run from the checkout
    return 0


def check(opts, work: Path, output: Path) -> dict:
    """Run the parts one process each, rewriting `output` after each; returns what it wrote."""
    from .common import git_commit, run_record, utc_now

    started = time.perf_counter()
    names = opts.parts or list(PARTS)
    command = " ".join(["python -m research.bench.gpu_check", *(sys.argv[1:] if opts.child is None else [])])
    record: dict = {
        "kind": "gpu_check",
        "dry_run": opts.dry_run,
        "budget_s": opts.budget_s,
        "steps": opts.steps,
        "parts": {},
    }
    commit = git_commit(ignore=(output,))
    if commit == "unknown" and opts.commit:
        commit = f"{opts.commit} (given: the tree had no git checkout)"

    def left() -> float:
        return opts.budget_s - (time.perf_counter() - started)

    def write() -> None:
        record["total_s"] = round(time.perf_counter() - started, 1)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(output)  # a reader (or a kill) never sees half a file

    # The model first, in its own process too (the parent never holds a CUDA context): its machine facts date the run.
    if left() < MIN_SECONDS["model"]:
        model = {"status": "skipped", "reason": f"time budget: {opts.budget_s:.0f} s is less than the model build's "
                 f"{MIN_SECONDS['model']} s"}  # fmt: skip
    else:
        model = _run_part("model", opts, work, left())
    info = model.pop("machine_info", None)
    if info is None:  # no part runs on the GPU after this: the parent may hold a CUDA context now
        from .common import machine_info

        info = machine_info()
    record["model"] = model
    record["measured"] = {"date": utc_now(), **run_record(info, command, commit)}
    record["gpu"] = model.pop("gpu", None)
    write()
    for name in names:
        if model["status"] != "pass":
            result = {"status": "skipped", "reason": f"no model: its build was {model['status']} (see model)"}
        elif opts.dry_run and name in NEEDS_CUDA and not opts.parts:
            result = {"status": "skipped", "reason": f"dry run: needs {NEEDS_CUDA[name]} (name it in --parts to run "
                      "it on CPU)"}  # fmt: skip
        elif left() < MIN_SECONDS[name]:
            result = {"status": "skipped", "reason": f"time budget: {max(left(), 0):.0f} s left of "
                      f"{opts.budget_s:.0f} s, the part needs >= {MIN_SECONDS[name]} s"}  # fmt: skip
        else:
            print(f"[gpu-check] {name}: {PARTS[name]} ...", file=sys.stderr, flush=True)
            result = _run_part(name, opts, work, left())
        record["parts"][name] = result
        print(f"[gpu-check] {name}: {result['status']}" + (f" ({result['seconds']:.0f} s)" if "seconds" in result
              else f": {result.get('reason', '')}"), file=sys.stderr, flush=True)  # fmt: skip
        write()
    print(f"[gpu-check] wrote {output} ({record['total_s']:.0f} s)", file=sys.stderr, flush=True)
    return record


def _run_part(name: str, opts, work: Path, seconds_left: float) -> dict:
    """Run one part in a process of its own (killed with its children when the budget runs out); its result as the
    part wrote it, or an error with the end of its log."""
    result_file, log_file = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    argv = ["-m", "research.bench.gpu_check", "--child", name, "--work-dir", str(work), "--steps", str(opts.steps)]
    argv += ["--dry-run"] if opts.dry_run else []
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # unbuffered: a killed part's log is whole
    if name == "zero2":
        argv, env = _accelerate_launch(argv, env, opts.dry_run)
    timeout = max(seconds_left, 1.0)
    t0 = time.perf_counter()
    code = run_logged([sys.executable, *argv], env, log_file, timeout)
    seconds = round(time.perf_counter() - t0, 1)
    if result_file.exists():
        result = json.loads(result_file.read_text())
    elif code is None:
        result = {"status": "error", "error": f"killed after {timeout:.0f} s: the time budget ran out"}
    else:
        result = {"status": "error", "error": f"the part's process exited with status {code} without a result"}
    if result["status"] != "pass":
        result["log_tail"] = log_file.read_text(errors="replace")[-LOG_TAIL:]
    return {**result, "seconds": seconds}


def run_logged(cmd: list[str], env: dict, log_file: Path, timeout: float) -> int | None:
    """Run `cmd` from the checkout, its output to `log_file`; its exit status, or None when it ran out of time and
    its whole process tree was killed: its process group, and every descendant found (torchrun, under accelerate
    launch, starts each rank in a session of its own; vLLM starts engine processes)."""
    import psutil  # an accelerate dependency

    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = []
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
            return None


def _accelerate_launch(argv: list[str], env: dict, dry_run: bool) -> tuple[list[str], dict]:
    """`accelerate launch` of the zero2 part on ONE process under the shipped ZeRO-2 config."""
    from epo_trl.cli.parser import RECIPES

    from .sync_separation import free_port

    config = RECIPES / "accelerate" / "zero2.yaml"
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
              "--mixed_precision", "no" if dry_run else "bf16", "--main_process_port", str(free_port())]  # fmt: skip
    if dry_run:  # DeepSpeed's CPU accelerator (tests/test_deepspeed.py does the same)
        env = {**env, "DS_ACCELERATOR": "cpu"}
    return [*launch, *argv], env


# ---------------------------------------------------------------------------------------------------- the children


def _child(opts) -> int:
    """One part in this process: write <work>/<part>.json with its status, timings and checks, or its error."""
    import traceback

    work = Path(opts.work_dir)
    t0 = time.perf_counter()
    try:
        result = CHILDREN[opts.child](work, opts.dry_run, opts.steps)
    except Exception as e:  # recorded, not raised: the parent goes on with the next part
        result = {"status": "error", "error": f"{type(e).__name__}: {str(e).strip()[:1000]}",
                  "traceback": traceback.format_exc()[-LOG_TAIL:]}  # fmt: skip
    result.setdefault("part_s", round(time.perf_counter() - t0, 1))
    if _rank() == 0:
        (work / f"{opts.child}.json").write_text(json.dumps(result, indent=1, default=_json_default))
    if opts.child == "zero2":  # under accelerate launch: tear the group down before exit (epo_trl.distributed)
        from epo_trl.distributed import destroy_process_group

        destroy_process_group()
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _json_default(value):
    return float(value) if hasattr(value, "__float__") else str(value)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_path(work: Path) -> Path:
    return work / "model"


def build_model(work: Path, dry_run: bool, steps: int) -> dict:
    """Save the random-init model (Qwen2.5-1.5B's shape, bf16; the dry run's toy shape, fp32) with the package's
    offline tokenizer holding every maze word whole; also report the machine."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from epo_trl.envs import make_factory
    from epo_trl.models.tiny import build_tokenizer, env_words

    from .common import machine_info

    shape = DRY_RUN_SHAPE if dry_run else QWEN25_15B_SHAPE
    dtype = torch.float32 if dry_run else torch.bfloat16
    tokenizer = build_tokenizer(env_words(make_factory("maze", **MAZE)))
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, dtype=dtype)  # fmt: skip
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # initialised on the GPU when there is one: 1.5B normal draws take a minute on a few CPU cores
    with torch.device("cuda" if _cuda() else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(model_path(work))
    tokenizer.save_pretrained(model_path(work))
    params = sum(p.numel() for p in model.parameters())
    gpu = None
    if _cuda():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
               "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}  # fmt: skip
    return {
        "status": "pass",
        "shape": shape,
        "params": params,
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer": f"epo_trl.models.tiny.build_tokenizer (maze words), {len(tokenizer)} tokens",
        "build_s": round(time.perf_counter() - t0, 1),
        "machine_info": machine_info(),
        "gpu": gpu,
    }


def train_run(work: Path, dry_run: bool, steps: int, algo: str, mode: str, name: str, **overrides) -> tuple:
    """`steps` optimizer steps of `algo` in `mode` through the CLI's own path (recipe + overrides, build_trainer):
    per-step seconds, peak GPU memory, the logged metrics, and whether the weights moved. Returns (record, the
    trainer, for checks of its own)."""
    import torch
    from transformers import PrinterCallback

    from epo_trl.cli.train import CPU_RECIPES, build_trainer, load_config, train_and_close

    from .common import quiet_logs

    quiet_logs()
    recipe = overrides.pop("recipe", f"maze_{algo}.yaml")
    values = {
        "model_name_or_path": str(model_path(work)), "env_kwargs": MAZE, "rollout_mode": mode,
        "max_turns": MAX_TURNS, "max_turn_tokens": TURN_TOKENS, "tasks_per_step": 2, "num_generations": 4,
        "max_completion_length": 1024,  # a trajectory row holds every turn and observation
        "max_steps": steps, "learning_rate": LEARNING_RATE, "output_dir": str(work / "runs" / name),
        "use_cpu": dry_run, "bf16": not dry_run, "gradient_checkpointing": True, "report_to": [],
        "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0, **overrides,
    }  # fmt: skip
    script, rollout_config, args = load_config([str(CPU_RECIPES / recipe)], overrides=values)
    trainer = build_trainer(script, rollout_config, args)
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    _, train_s = train_and_close(trainer)
    peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None  # since the first step began
    before = timer.before or []
    moved = sum(a != b for a, b in zip(before, fingerprint(trainer.model)))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = [{k: v for k, v in entry.items() if _kept_metric(k)} for entry in logs]
    losses = [entry["loss"] for entry in logs]
    checks = {
        f"{steps} optimizer steps": trainer.state.global_step == steps and len(logs) == steps,
        "every loss finite": bool(losses) and all(math.isfinite(x) for x in losses),
        f"{METHOD_METRIC[algo]} logged every step": all(METHOD_METRIC[algo] in entry for entry in logs),
        "the weights moved": moved > 0,
    }
    run = {
        "algo": algo,
        "mode": mode,
        "steps": trainer.state.global_step,
        "step_s": timer.seconds,
        # the first step creates the optimizer and warms kernels up: the later ones are the steady state
        "step_s_median": statistics.median(timer.seconds[1:] or timer.seconds),
        "train_s": round(train_s, 2),
        "rows_per_step": args.per_device_train_batch_size,
        "peak_gpu_gib": None if peak is None else round(peak, 2),
        "gpu_gib_at_start": None if timer.gib_at_start is None else round(timer.gib_at_start, 2),
        "tensors_moved": f"{moved}/{len(before)}",
        "metrics": metrics,
        "checks": checks,
        "status": "pass" if all(checks.values()) else "fail",
    }
    return run, trainer


def _kept_metric(key: str) -> bool:
    return key in ("loss", "entropy", "reward", "num_tokens") or key.startswith(
        ("epo/smooth", "epo/beta", "aepo/", "vllm/", "sampling/importance_sampling_ratio/")
    )


def fingerprint(model) -> list[float]:
    """One float64 sum per parameter tensor: an optimizer step that moved a tensor changes its sum."""
    import torch

    with torch.no_grad():
        return [p.detach().double().sum().item() for p in model.parameters()]


class StepTimer:
    """Wall seconds of every optimizer step (rollout + training), the GPU's queue drained at both ends; at the first
    step's start, the weights' fingerprint and the GPU's peak-memory reset. Not earlier: DeepSpeed casts the weights
    to bf16 when the trainer prepares it, after `on_train_begin`, and a cast is no optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.seconds: list[float] = []
                self.before: list[float] | None = None
                self.gib_at_start: float | None = None

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if self.before is None:
                    self.before = fingerprint(model)
                    if _cuda():
                        import torch

                        self.gib_at_start = torch.cuda.memory_allocated() / 2**30  # weights, and any leftover
                        torch.cuda.reset_peak_memory_stats()
                _sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, *_, **__):
                _sync()
                self.seconds.append(round(time.perf_counter() - self.t0, 3))

        return _Timer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release_memory() -> None:
    """Give a finished trainer's GPU memory back (its last reference dropped by the caller) before the next run in
    this process; what stays allocated shows in the next run's `gpu_gib_at_start`."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _runs(work: Path, dry_run: bool, steps: int, plan, **overrides) -> dict:
    """Several training runs, each under its own try/except; the part passes when every run does."""
    runs = {}
    for algo, mode in plan:
        name = f"{algo}-{mode}"
        try:
            runs[name], _ = train_run(work, dry_run, steps, algo, mode, name, **dict(overrides))
        except Exception as e:
            runs[name] = {"algo": algo, "mode": mode, "status": "error",
                          "error": f"{type(e).__name__}: {str(e).strip()[:1000]}"}  # fmt: skip
        _release_memory()
    status = "pass" if all(r["status"] == "pass" for r in runs.values()) else "fail"
    return {"status": status, "runs": runs}


def part_epo_aepo(work: Path, dry_run: bool, steps: int) -> dict:
    return _runs(work, dry_run, steps, RUNS)


def part_vllm_colocate(work: Path, dry_run: bool, steps: int) -> dict:
    """EPO, step mode, rollouts on a colocated vLLM engine; SyncCheck probes the engine after every push (and
    raises StaleEngineError above the tolerance, which the run records as its error)."""
    overrides = {"recipe": "maze_epo_vllm.yaml", "use_vllm": True, "vllm_mode": "colocate",
                 "vllm_enable_sleep_mode": False, "vllm_sync_check": True, "vllm_max_model_length": VLLM_MAX_LEN}  # fmt: skip
    if not dry_run:
        overrides["vllm_gpu_memory_utilization"] = VLLM_MEMORY
    t0 = time.perf_counter()
    run, trainer = train_run(work, dry_run, steps, "epo", "step", "epo-vllm", **overrides)
    check = trainer.vllm_sync_check
    run["probe_diffs"] = list(check.diffs) if check is not None else []
    run["tolerance"] = check.tolerance if check is not None else None
    ratios = [m["sampling/importance_sampling_ratio/mean"] for m in run["metrics"]
              if "sampling/importance_sampling_ratio/mean" in m]  # fmt: skip
    run["is_ratio_mean"] = statistics.fmean(ratios) if ratios else None
    # TRL pushes before every step's generation, the first too (measured on CPU: 3 pushes in 3 steps)
    run["checks"][f"{steps} pushes, each probed"] = len(run["probe_diffs"]) >= steps
    run["checks"]["every probe within the tolerance"] = all(d <= run["tolerance"] for d in run["probe_diffs"])
    run["status"] = "pass" if all(run["checks"].values()) else "fail"
    run["part_s"] = round(time.perf_counter() - t0, 1)
    return {"status": run["status"], "runs": {"epo-step-vllm": run}}


def part_zero2(work: Path, dry_run: bool, steps: int) -> dict:
    """Runs inside `accelerate launch` (see _accelerate_launch): the run must really be DeepSpeed ZeRO stage 2."""
    overrides = {"ddp_backend": "gloo", "use_cpu": False} if dry_run else {}  # CPU ranks: accelerate drops DeepSpeed
    run, trainer = train_run(work, dry_run, steps, "epo", "step", "epo-zero2", **overrides)
    plugin = trainer.accelerator.state.deepspeed_plugin
    run["distributed_type"] = str(trainer.accelerator.distributed_type)
    run["zero_stage"] = plugin.zero_stage if plugin is not None else None
    run["processes"] = trainer.accelerator.num_processes
    run["checks"]["DeepSpeed ZeRO stage 2"] = run["zero_stage"] == 2 and "DEEPSPEED" in run["distributed_type"]
    run["status"] = "pass" if all(run["checks"].values()) else "fail"
    return {"status": run["status"], "runs": {"epo-step-zero2": run}}


def part_loss_overhead(work: Path, dry_run: bool, steps: int) -> dict:
    """research/bench/loss_overhead.py as `make bench` runs it, on CUDA (quick: 3 interleaved repetitions)."""
    from . import loss_overhead

    results = loss_overhead.run(quick=not dry_run, smoke=dry_run, device="cpu" if dry_run else "cuda")
    finite = all(
        math.isfinite(row[k]) for row in results.values() for k in ("time_ratio_vs_bonus", "time_ratio", "epo_step_s")
    )
    targets = {
        model: {"time EPO / bonus <= 1.03": row["time_ratio_vs_bonus"] <= 1.03,
                "memory EPO / bonus <= 1.02": row["memory_ratio_vs_bonus"] <= 1.02}
        for model, row in results.items()
    }  # fmt: skip
    # pass = it measured (finite numbers); whether EPO meets its overhead targets is the finding, reported beside
    return {"status": "pass" if results and finite else "fail", "results": results, "targets": targets}


CHILDREN = {
    "model": build_model,
    "epo_aepo": part_epo_aepo,
    "vllm_colocate": part_vllm_colocate,
    "zero2": part_zero2,
    "loss_overhead": part_loss_overhead,
}


# ---------------------------------------------------------------------------------------------------- the report


def to_markdown(record: dict) -> str:
    """The GPU section's body from a record this module wrote (research.bench adds the heading and the Measured line,
    and section 1's table for the loss_overhead part)."""
    from .common import md_table

    gpu, model = record.get("gpu") or {}, record.get("model") or {}
    lines = []
    if gpu:
        lines.append(f"- GPU: {gpu['name']} ({gpu['memory_gib']} GiB, compute capability {gpu['capability']}), "
                     f"CUDA {gpu['cuda']}")  # fmt: skip
    if model.get("shape"):
        shape = model["shape"]
        lines.append(
            f"- model: random init, {_count(model['params'])} parameters saved in {model['dtype']} (hidden "
            f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / "
            f"{shape['num_key_value_heads']} KV heads, MLP {shape['intermediate_size']}, vocab {shape['vocab_size']}"
            f"{', tied embeddings' if shape.get('tie_word_embeddings') else ''}); tokenizer {model['tokenizer']}; "
            f"built in {model.get('build_s', float('nan')):.0f} s"
        )
    lines.append(
        f"- budget {record['budget_s']:.0f} s, used {record.get('total_s', float('nan')):.0f} s; {record['steps']} "
        f"optimizer steps per run on a {MAZE['size']}x{MAZE['size']} `{MAZE['task']}` maze ({MAX_TURNS} turns x "
        f"<= {TURN_TOKENS} tokens, 2 tasks x 4 episodes per step); s/step = median of the steps after the first "
        "(rollout + training; on a GPU, synchronised at both ends)"
    )
    rows = [[name, _status(p), f"{p['seconds']:.0f}" if "seconds" in p else "", _summary(name, p)]
            for name, p in record["parts"].items()]  # fmt: skip
    lines += ["", md_table(["part", "status", "s", "result"], rows)]
    runs = [(name, run) for part in record["parts"].values() for name, run in (part.get("runs") or {}).items()]
    if runs:
        header = ["run", "status", "s/step", "first step s", "GPU GiB: at start / peak", "loss (last)", "entropy (last)",
                  "weights moved", "failed checks / error"]  # fmt: skip
        table = []
        for name, run in runs:
            last = (run.get("metrics") or [{}])[-1]
            failed = [k for k, ok in (run.get("checks") or {}).items() if not ok]
            table.append([
                name, _status(run), _num(run.get("step_s_median")), _num((run.get("step_s") or [None])[0]),
                _gib(run), _num(last.get("loss")), _num(last.get("entropy")),
                run.get("tensors_moved", ""), _cell("; ".join(failed) or run.get("error", "")),
            ])  # fmt: skip
        lines += ["", md_table(header, table)]
    vllm = (record["parts"].get("vllm_colocate", {}).get("runs") or {}).get("epo-step-vllm")
    if vllm and vllm.get("probe_diffs") is not None:
        diffs = ", ".join(f"{d:.3g}" for d in vllm["probe_diffs"]) or "none"
        ratio = vllm.get("is_ratio_mean")
        lines += ["", f"- vLLM colocate: probe mean |engine - trainer| log p after each push: {diffs} (tolerance "
                  f"{vllm.get('tolerance')}); TRL's importance-sampling ratio, mean over steps: "
                  f"{'n/a' if ratio is None else f'{ratio:.4f}'}"]  # fmt: skip
    zero = (record["parts"].get("zero2", {}).get("runs") or {}).get("epo-step-zero2")
    if zero and "zero_stage" in zero:
        lines += [f"- ZeRO-2: {zero['distributed_type']}, stage {zero['zero_stage']}, {zero['processes']} process(es)"]
    return "\n".join(lines)


def _status(entry: dict) -> str:
    status = entry.get("status", "?")
    return f"**{status.upper()}**" if status in ("fail", "error") else status


def _summary(name: str, part: dict) -> str:
    """One cell: why a part was skipped or broke, else what it checked."""
    if part["status"] == "skipped":
        return _cell(part.get("reason", ""))
    if part["status"] == "error":
        return _cell(part.get("error", ""))
    runs = part.get("runs") or {}
    if runs:
        passed = sum(r.get("status") == "pass" for r in runs.values())
        return f"{passed}/{len(runs)} runs pass: {', '.join(runs)}"
    targets = part.get("targets") or {}
    met = [f"{model}: {', '.join(k + (' met' if ok else ' NOT met') for k, ok in t.items())}"
           for model, t in targets.items()]  # fmt: skip
    return _cell("; ".join(met))


def _gib(run: dict) -> str:
    """Allocated GPU memory when the first step began (the trainer's weights; more means an earlier run's leftovers)
    and the peak over the steps."""
    if run.get("peak_gpu_gib") is None:
        return ""
    return f"{_num(run.get('gpu_gib_at_start'))} / {_num(run['peak_gpu_gib'])}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _num(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _cell(text: str, limit: int = 200) -> str:
    """Text for one table cell: one line, no column breaks, at most `limit` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":
    raise SystemExit(main())
