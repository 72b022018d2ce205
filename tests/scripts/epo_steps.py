"""A few EPO optimizer steps on 2 ranks that see different data, under any accelerate config (DDP, ZeRO-2/3).

Launched by `run_once()` (tests) as `accelerate launch --config_file CONFIG --num_processes 2 epo_steps.py MODEL OUT`.
Rank r plays 2 + r turns per episode, so ranks hold different numbers of turns; smoothing is on, so from step 2
on the loss uses the shared entropy history as reference. Each rank writes OUT/rank{r}.json (entropy history,
prompts seen, per-step EPO metrics, the distributed setup) and OUT/rank{r}.pt (every parameter, gathered in full
under ZeRO-3).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(os.path.dirname(TESTS), "recipes", "accelerate")
NUM_STEPS = 3


def free_port() -> str:
    """A port free on 127.0.0.1 now, for a launch's rendezvous: a fixed one fails by chance (another launch, or the
    last run's socket in TIME_WAIT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def accelerate_launch(config: str, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of ARGV (a script and its args, or `-m module ...`) on 2 CPU processes under the shipped
    recipes/accelerate/CONFIG.yaml. On timeout every process it started is killed (a deadlock fails, not hangs)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(RECIPES, f"{config}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port, *argv,
    ]  # fmt: skip
    # DeepSpeed's CPU accelerator (gloo); one thread per rank: 2 ranks share the 2 cores.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # an accelerate dependency

        # torchrun puts each rank in a session of its own: kill the whole tree, whose ranks hold our pipes open.
        launcher = psutil.Process(proc.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{config}: no exit after {timeout} s (deadlock?)\n{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


_RUNS: dict[tuple[str, str], str] = {}


def run_once(config: str, model_path: str, tmp_path_factory, mode: str = "rollout") -> str:
    """OUT folder of a finished launch under CONFIG, run at most once per test session (DDP is everyone's baseline).
    mode "rollout": a scripted rollout_func; "tools": TRL's tool loop on an environment_factory (tool_policy.py)."""
    if (config, mode) not in _RUNS:
        out = str(tmp_path_factory.mktemp(f"epo_steps_{config}_{mode}"))
        proc = accelerate_launch(config, [os.path.abspath(__file__), model_path, out, mode])
        assert proc.returncode == 0, proc.stderr[-4000:]
        _RUNS[config, mode] = out
    return _RUNS[config, mode]


def load_run(out: str) -> tuple[list[dict], list[dict]]:
    """(per-rank json records, per-rank parameter dicts) written by `main`."""
    import torch

    records = [json.loads(Path(os.path.join(out, f"rank{r}.json")).read_text()) for r in (0, 1)]
    return records, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1)]


def full_parameters(trainer) -> dict:
    """name -> full parameter tensor, on every rank (ZeRO-3 shards parameters: gather them first)."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    params = dict(trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters())
    gather = contextlib.nullcontext()
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()))
    with gather:
        return {name: p.detach().clone() for name, p in params.items()}


# Trainer args for DeepSpeed on CPU ranks. accelerate drops DeepSpeed under `use_cpu=True` (the device is the CPU
# anyway); without it the gloo backend must be named, else accelerate counts 1 process and DeepSpeed's batch-size
# check fails (4 != 4 * 1 * 2). DDP on CPU ranks needs `use_cpu=True`.
DEEPSPEED_CPU_ARGS = {"use_cpu": False, "ddp_backend": "gloo"}


def main(model_path: str, out: str, mode: str = "rollout") -> None:
    import torch
    from datasets import Dataset

    from epo_trl import EPOConfig, EPOTrainer

    sys.path.insert(0, TESTS)
    from helpers import length_reward, scripted_rollout, tiny_args

    seen = []

    def rollout(prompts, trainer):
        seen.extend(prompts)
        return scripted_rollout(num_turns=2 + trainer.accelerator.process_index)(prompts, trainer)

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    # A zero-width band (kappa 1, 1) makes every token pay |H - H_ref|: the penalty has a gradient from step 2 on.
    args = tiny_args(
        EPOConfig, out, max_steps=NUM_STEPS, entropy_coef=0.05, smoothing_coef=1.0, smoothing_kappa_low=1.0,
        smoothing_kappa_high=1.0, **(DEEPSPEED_CPU_ARGS if deepspeed else {"use_cpu": True}),
    )  # fmt: skip
    if mode == "tools":  # rank r's policy stops less often: ranks hold different numbers of turns
        from tool_policy import Counter, ScriptedToolPolicy, increment_call

        args.max_completion_length = 160
        ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"count {i}"}] for i in range(16)]})
        trainer = EPOTrainer(model_path, None, args=args, train_dataset=ds, environment_factory=Counter)
        ScriptedToolPolicy(trainer, increment_call, stop_probability=0.5 - 0.25 * trainer.accelerator.process_index)
        generate = trainer._generate_and_score_completions

        def spy(inputs):
            seen.extend(x["prompt"][0]["content"] for x in inputs)
            return generate(inputs)

        trainer._generate_and_score_completions = spy
    else:
        ds = Dataset.from_dict({"prompt": [f"go north {i}" for i in range(16)]})
        trainer = EPOTrainer(model_path, length_reward, args=args, train_dataset=ds, rollout_func=rollout)
    trainer.train()
    acc = trainer.accelerator
    plugin = acc.state.deepspeed_plugin
    params = full_parameters(trainer)
    torch.save(params, os.path.join(out, f"rank{acc.process_index}.pt"))
    steps = [log for log in trainer.state.log_history if "epo/smooth_penalty" in log]
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(
            {
                "history": trainer.entropy_history.state_dict(),
                "prompts": seen,
                "world": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "zero_stage": plugin.zero_stage if plugin is not None else None,
                "steps": steps,
            },
            f,
        )


if __name__ == "__main__":
    from epo_trl.distributed import destroy_process_group

    main(*sys.argv[1:4])
    destroy_process_group()  # every rank gets here: no live process group at interpreter exit
