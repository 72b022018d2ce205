"""Behaviour-cloning warm start for tiny offline models (demo, study, tests).

A randomly initialised tiny model almost never reaches a sparse reward, so RL has nothing to reinforce. Real
runs start from an instruction-tuned LLM; here a few hundred supervised steps on expert episodes play that role.
The expert turns are rendered by the real step-mode rollout engine (same prompts, same action format), so the
warm-started model sees exactly the prompts RL will show it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from ..envs import EnvFactory, TaskSpec
from ..rollout import Generation, RolloutConfig
from ..rollout.engine import engine_for
from ..rollout.evaluation import sampled_summary

# Expert episodes rendered at once by `expert_turns`; later batches reuse the envs of the first.
RENDER_BATCH = 16


class PlanBackend:
    """Plays fixed per-episode plans through the lockstep engine.

    The engine sends, each turn, the prompts of the still-active episodes in episode order; an episode that follows
    a plan that wins (or stops at `max_turns`) is active exactly while turns remain in its plan, so call k serves
    the episodes with len(plan) > k.
    """

    lockstep = False

    def __init__(self, plans: Sequence[Sequence[str]], tokenizer, action_tags=("<action>", "</action>")):
        self.plans, self.tokenizer, self.tags, self.calls = plans, tokenizer, action_tags, 0

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None) -> Generation:
        active = [i for i, plan in enumerate(self.plans) if len(plan) > self.calls]
        if len(active) != len(prompts):
            why = ("an episode ended before its plan (the plan goes on after the game is won or lost)"
                   if len(prompts) < len(active) else "a plan ended before its episode did")  # fmt: skip
            raise RuntimeError(
                f"{len(prompts)} prompts for {len(active)} planned episodes: {why}. Plans must end exactly where "
                "their episode ends (a win), or run to max_turns."
            )
        ids = [action_ids(self.tokenizer, self.plans[i][self.calls], self.tags, max_new_tokens) for i in active]
        self.calls += 1
        return Generation(ids, [[0.0] * len(x) for x in ids])


def action_ids(tokenizer, action: str, tags: tuple[str, str], max_new_tokens: int) -> list[int]:
    """The completion a model writes for `action`: tagged text, then EOS (within the turn's token budget)."""
    return tokenizer(f"{tags[0]}{action}{tags[1]}")["input_ids"][: max_new_tokens - 1] + [tokenizer.eos_token_id]


def noisy_plans(
    factory: EnvFactory, tasks: Sequence[TaskSpec], max_turns: int, noise: float, seed: int = 0
) -> list[list[str]]:
    """Per task, the commands a noisy demonstrator plays: each turn, with probability `noise` a uniformly random
    admissible action, else the expert's next move from the current state (re-planned with `factory.solve(task,
    prefix)`), until the episode ends or `max_turns` turns are played (such a plan may not win).

    Cloning these plays teaches the mixture policy `(1 - noise) * expert + noise * uniform(admissible)` on the
    states that policy itself visits, including the recoveries after its own detours.
    """
    rng = random.Random(seed)
    env = factory.make()
    plans = []
    try:
        for task in tasks:
            env.reset(task)
            plan: list[str] = []
            done = False
            while not done and len(plan) < max_turns:
                actions = env.admissible_actions()
                action = rng.choice(actions) if actions and rng.random() < noise else factory.solve(task, plan)[0]
                plan.append(action)
                _, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            plans.append(plan)
    finally:
        env.close()
    return plans


def expert_turns(
    factory: EnvFactory,
    tasks: Sequence[TaskSpec],
    tokenizer,
    config: RolloutConfig,
    mode: str = "step",
    plans: Sequence[Sequence[str]] | None = None,
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, completion_ids, loss_mask) samples of expert episodes (or of the given per-task `plans`, e.g.
    `noisy_plans`), rendered by the engine in `mode`.

    Step mode: one sample per turn (mask all ones). Trajectory mode: one sample per episode, the mask being the
    rollout's `env_mask` (observations are context, not targets), exactly the rows RL trains on.
    """
    tasks = list(tasks)
    plans = list(plans) if plans is not None else [factory.solve(t) for t in tasks]
    episodes = []
    # in batches that share the engine's envs (a TextWorldExpress env is a JVM: started once, reset cheaply)
    with engine_for(factory, tokenizer, config) as engine:
        for start in range(0, len(tasks), RENDER_BATCH):
            batch = slice(start, start + RENDER_BATCH)
            backend = PlanBackend(plans[batch], tokenizer, config.action_tags)
            episodes += engine.run(tasks[batch], backend, mode).episodes
    if mode == "trajectory":
        return [(e.prompt_ids, e.completion_ids, e.env_mask) for e in episodes]
    return [(t.prompt_ids, t.completion_ids, [1] * len(t.completion_ids)) for e in episodes for t in e.turns]


def behaviour_clone(
    model,
    samples: Sequence[tuple[list[int], list[int], list[int]]],
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    pad_token_id: int = 0,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 25,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """Supervised steps on (prompt, completion, mask) samples (loss on masked completion tokens); returns losses.

    `stop(step)`, called every `check_every` steps (model in eval mode), ends cloning early when it returns True.
    Gradients are clipped to `max_grad_norm` (None: no clipping): unclipped, one hidden-64 seed in five diverged
    at lr 3e-3 (invalid actions 0.96 after 600 steps; docs/study/setting.md).
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        batch = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
        width = max(len(p) + len(c) for p, c, _ in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attention = torch.zeros_like(ids)
        for row, (p, c, m) in enumerate(batch):  # left-pad, like generation
            seq = p + c
            ids[row, width - len(seq) :] = torch.tensor(seq)
            labels[row, width - len(c) :] = torch.tensor([t if keep else -100 for t, keep in zip(c, m)])
            attention[row, width - len(seq) :] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if stop is not None and step % check_every == 0:
            model.eval()
            if stop(step):
                break
            model.train()
    model.eval()
    return losses


def warm_start(model_dir: str, factory: EnvFactory, tasks: Sequence[TaskSpec], config: RolloutConfig,
               mode: str = "step", *, steps: int, seed: int = 0, target_success: float | None = None,
               check_every: int = 50, check_tasks: int = 32, noise: float = 0.0, noisy_steps: int = 0,
               learning_rate: float = 3e-3, batch_size: int = 16,
               log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Behaviour-clone the model saved in `model_dir` on expert episodes of `tasks`, in place; return a summary.

    `steps` clone the expert. With `target_success`, that phase stops at the first check (every `check_every`
    steps) where the model, sampling, wins at least that share of the first `check_tasks` tasks; `steps` is then
    the cap. Then `noisy_steps` clone a noisy demonstrator's plays (`noisy_plans`: a random admissible action with
    probability `noise`, else the expert's move): a model that first learned to read the observation from the
    expert converges there to the demonstrator's mixture, an imperfect start whose quality does not depend on where
    cloning happened to stop. `log` (e.g. `print`) receives a progress line per check and per phase.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if noise and not noisy_steps:
        raise ValueError(f"noise={noise} applies to the noisy phase only: set noisy_steps > 0 (or noise=0).")
    if noisy_steps and not 0 < noise <= 1:
        raise ValueError(f"noise={noise} must be in (0, 1] when noisy_steps={noisy_steps} > 0.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = expert_turns(factory, tasks, tokenizer, config, mode)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    checks: list[tuple[int, float]] = []

    say = log or (lambda line: None)

    def reached(step: int) -> bool:
        summary = sampled_summary(model, tokenizer, factory, tasks[:check_tasks], config, 1.0, seed, mode)
        checks.append((step, summary["success_rate"]))
        say(f"warm start: expert cloning step {step}/{steps}, sampled train success {checks[-1][1]:.2f} "
            f"(stops at {target_success})")  # fmt: skip
        return checks[-1][1] >= target_success

    torch.manual_seed(seed)
    losses = behaviour_clone(model, samples, steps=steps, batch_size=batch_size, lr=learning_rate, seed=seed,
                             pad_token_id=tokenizer.pad_token_id, check_every=check_every,
                             stop=reached if target_success is not None else None)  # fmt: skip
    say(f"warm start: {len(losses)} expert cloning steps, loss {losses[-1] if losses else float('nan'):.4f}")
    noisy_losses = []
    if noisy_steps:
        say(f"warm start: {noisy_steps} steps on the noisy demonstrator (random admissible action {noise:.0%})")
        plans = noisy_plans(factory, tasks, config.max_turns, noise, seed)
        noisy = expert_turns(factory, tasks, tokenizer, config, mode, plans)
        noisy_losses = behaviour_clone(model, noisy, steps=noisy_steps, batch_size=batch_size, lr=learning_rate,
                                       seed=seed + 1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.save_pretrained(model_dir)
    return {
        "steps": len(losses),
        "noisy_steps": len(noisy_losses),
        "expert_samples": len(samples),
        "expert_loss": losses[-1] if losses else None,
        "final_loss": (noisy_losses or losses or [None])[-1],
        "success_checks": checks,
        "train_success": checks[-1][1] if checks else None,
    }
