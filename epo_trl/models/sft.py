"""Warm start of a pretrained LLM with TRL's own `SFTTrainer` on expert episodes, before RL.

An instruction-tuned 135M model scores 0 on the maze zero-shot: it never writes `<action>...</action>`. A short
supervised phase teaches the format and some of the task; RL then has wins to reinforce. The samples are rendered
by the real rollout engine (`expert_turns`: same chat template, system prompt, history and action tags as RL), and
passed to `SFTTrainer` pre-tokenized with `labels` = the assistant's action tokens only (-100 on the prompt and, in
trajectory mode, on the env's observations), so the loss is exactly the tokens RL will train.

`target_success` stops the phase at the first check where the model, sampling, wins that share of the check tasks
(`TargetSuccess`, a `TrainerCallback`): RL starts competent but imperfect, as in the tiny demo.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence

from ..envs import EnvFactory, TaskSpec
from ..rollout import RolloutConfig
from ..rollout.evaluation import sampled_summary
from .warmstart import expert_turns, noisy_plans


def sft_dataset(samples: Sequence[tuple[list[int], list[int], list[int]]]):
    """A pre-tokenized `datasets.Dataset` for `SFTTrainer`: `input_ids` = prompt + completion, `labels` = the
    completion's masked-in tokens (-100 elsewhere)."""
    from datasets import Dataset

    rows = {"input_ids": [], "labels": []}
    for prompt, completion, mask in samples:
        rows["input_ids"].append(list(prompt) + list(completion))
        rows["labels"].append([-100] * len(prompt) + [t if keep else -100 for t, keep in zip(completion, mask)])
    return Dataset.from_dict(rows)


def target_success_callback(check: Callable[[], float], every: int, target: float, history: list):
    """A `TrainerCallback` that calls `check()` (sampled success) every `every` optimizer steps, appends
    `(step, success)` to `history` and stops training once success >= `target`."""
    from transformers import TrainerCallback

    class TargetSuccess(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                history.append((state.global_step, check()))
                if history[-1][1] >= target:
                    control.should_training_stop = True
            return control

    return TargetSuccess()


def sft_warm_start(model_dir: str, output_dir: str, factory: EnvFactory, tasks: Sequence[TaskSpec],
                   config: RolloutConfig, mode: str = "trajectory", *, steps: int = 200,
                   learning_rate: float = 1e-4, batch_size: int = 8, target_success: float | None = None,
                   check_every: int = 10, check_tasks: int = 32, noise: float = 0.0, noisy_steps: int = 0,
                   seed: int = 0, bf16: bool = True, use_cpu: bool = True,
                   log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """SFT the model in `model_dir` on expert episodes of `tasks`; save it (and its tokenizer) to `output_dir`;
    return a summary.

    `steps` optimizer steps of `batch_size` samples on the expert, stopped early at `target_success` (checked
    every `check_every` steps on the first `check_tasks` tasks, sampling at temperature 1). Then `noisy_steps` on a
    noisy demonstrator's plays (`noisy_plans`: a random admissible action with probability `noise`).
    `bf16` / `use_cpu`: as the RL trainer that follows in this process will ask (accelerate allows one setting).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if noisy_steps and not 0 < noise <= 1:
        raise ValueError(f"noise={noise} must be in (0, 1] when noisy_steps={noisy_steps} > 0.")
    say = log or (lambda line: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    checks: list[tuple[int, float]] = []

    def check() -> float:
        rate = sampled_summary(model, tokenizer, factory, tasks[:check_tasks], config, 1.0, seed, mode)["success_rate"]
        say(f"warm start (SFT): sampled train success {rate:.2f} after {len(checks) * check_every + check_every} steps"
            f" (stops at {target_success})")  # fmt: skip
        return rate

    def phase(samples, steps: int, callbacks=()) -> tuple[int, list[float]]:
        from transformers import PrinterCallback

        args = SFTConfig(
            output_dir=scratch,  # nothing is saved there (save_strategy="no"); the model goes to output_dir
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            use_cpu=use_cpu,
            bf16=bf16,
            logging_steps=1,  # log_history holds every step's loss (first_loss, expert_loss)
            save_strategy="no",
            report_to=[],
            disable_tqdm=log is None,  # a progress bar when the caller shows progress
            seed=seed,
            max_length=None,  # samples are already as long as the rollout allows
            dataloader_num_workers=0,
            gradient_checkpointing=False,  # SFTConfig defaults to True: it recomputes activations
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(samples), processing_class=tokenizer,
                             callbacks=list(callbacks))  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the raw log dicts; the summary lines go through `log`
        from ..cli.console import use_console

        # the bar with one short line per step, as the RL steps that follow print them
        console = use_console(trainer) if log is not None else None
        try:
            trainer.train()
        finally:
            if console is not None:
                console.close()
        return trainer.state.global_step, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    samples = expert_turns(factory, tasks, tokenizer, config, mode)
    say(f"warm start (SFT): {steps} steps of {batch_size} on {len(samples)} expert samples of {len(tasks)} tasks "
        f"(mean {sum(len(p) + len(c) for p, c, _ in samples) / len(samples):.0f} tokens)")  # fmt: skip
    callbacks = [target_success_callback(check, check_every, target_success, checks)] if target_success else []
    scratch = tempfile.mkdtemp(prefix="sft-")
    expert_steps, losses = phase(samples, steps, callbacks)
    say(f"warm start (SFT): {expert_steps} steps on {len(samples)} expert samples, loss {losses[-1]:.4f}")
    noisy_losses: list[float] = []
    if noisy_steps:
        say(f"warm start (SFT): {noisy_steps} steps on the noisy demonstrator (random admissible action {noise:.0%})")
        plans = noisy_plans(factory, tasks, config.max_turns, noise, seed)
        _, noisy_losses = phase(expert_turns(factory, tasks, tokenizer, config, mode, plans), noisy_steps)
    shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    say(f"warm start (SFT): done, final loss {(noisy_losses or losses)[-1]:.4f}; saved to {output_dir}")
    return {
        "trainer": "trl.SFTTrainer",
        "steps": expert_steps,
        "noisy_steps": noisy_steps,
        "expert_samples": len(samples),
        "first_loss": losses[0] if losses else None,
        "expert_loss": losses[-1] if losses else None,
        "final_loss": (noisy_losses or losses or [None])[-1],
        "success_checks": checks,
        "train_success": checks[-1][1] if checks else None,
    }
