"""Extra samples in a generation step: the machinery behind `MultiTurnGRPOTrainer.sample_more`.

A method that needs more samples than TRL's batch (AEPO re-samples prompts at a shifted temperature) asks the base
for them; it never touches TRL's generation state itself. The samples go through TRL's own generation path (HF
generate, vLLM, or the `rollout_func`; with `tools` / `environment_factory`, TRL's tool loop with an environment
instance per sample), are scored by the trainer's reward functions, and leave TRL's metrics and per-batch state as
they were. Every TRL name this reads or swaps is in trl_surface.py.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..trl_surface import TOOL_BATCH_STATE
from .step_batch import episode_returns


@dataclass
class ExtraSamples:
    """This rank's extra samples of one `sample_more` call."""

    rewards: torch.Tensor  # (units,) reward of each sampled row or, in step mode, each episode's return; NaN: unscored
    samples: list[tuple]  # (prompt ids, completion ids, action mask or None) per training row
    unit: torch.Tensor  # (len(samples),) index into `rewards` of each sample (step mode: a turn's episode)


def sample_more(trainer, rows: list[dict], temperature: float, num_generations: int) -> ExtraSamples:
    """Sample each of `rows` once at `temperature`; rows come in groups of `num_generations` copies of a dataset row
    (TRL's layout). Collective: every rank calls it with the same number of rows."""
    prompts = [x.get("prompt", [{"role": "user", "content": ""}]) for x in rows]  # TRL's default with envs
    with _sampling(trainer, temperature, num_generations), _environments(trainer, rows, prompts):
        if getattr(trainer.rollout_func, "mode", None) == "step":  # a user's rollout_func may have no `mode`
            return _step_samples(trainer, prompts)
        return _row_samples(trainer, rows, prompts)


def _row_samples(trainer, rows: list[dict], prompts: list) -> ExtraSamples:
    """One sample per row through TRL's generation path (HF generate, vLLM, or a one-row-per-prompt
    `rollout_func`), scored by the reward functions; each sample is its own unit."""
    device, rank = trainer.accelerator.device, trainer.accelerator.process_index
    prompt_ids, completion_ids, tool_mask, completions, _, extra, images, _ = trainer._generate(prompts)
    if images is not None:
        raise ValueError("Extra samples do not support image inputs (AEPOTrainer: use EPOTrainer for VLMs).")
    for i, row in enumerate(rows):  # rollout extras (episode_return, ...) feed the reward functions
        row.update({k: (v[i] if isinstance(v, list) else v) for k, v in extra.items()})
    rewards_per_func = trainer._calculate_rewards(rows, prompts, completions, completion_ids)  # gathered
    rewards = (rewards_per_func * trainer.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: never kept
    rewards = rewards[rank * len(rows) : (rank + 1) * len(rows)]
    masks = tool_mask if tool_mask is not None else [None] * len(completion_ids)
    samples = list(zip(prompt_ids, completion_ids, masks))
    return ExtraSamples(rewards, samples, torch.arange(len(samples), device=device))


def _step_samples(trainer, prompts: list) -> ExtraSamples:
    """Step mode: play one episode per prompt with the step rollout; every turn is a sample (the unit of the
    step-mode loss), scored by its episode's return as the step-mode batch is (NaN = failed episode)."""
    rollout, device = trainer.rollout_func, trainer.accelerator.device
    episodes = rollout.play(prompts, trainer).episodes
    samples = [(t.prompt_ids, t.completion_ids, None) for e in episodes for t in e.turns]
    unit = torch.tensor([i for i, e in enumerate(episodes) for _ in e.turns], dtype=torch.long, device=device)
    return ExtraSamples(episode_returns(rollout, episodes, device), samples, unit)


@contextmanager
def _environments(trainer, rows: list[dict], prompts: list):
    """With `tools` / `environment_factory`: give every sample its environment instance (reset with its row, the
    observation appended to its prompt, in place) and its tool dicts, as GRPOTrainer's
    `_generate_and_score_completions` does for the batch (TRL 1.16); TRL's batch state is restored after."""
    if not trainer.tools:
        yield
        return
    # TRL sets the per-batch ones in each generation batch, so a step-mode rollout may run before they exist:
    # restore exactly what was there, absence included.
    saved = {k: vars(trainer)[k] for k in TOOL_BATCH_STATE if k in vars(trainer)}
    environments = []
    if trainer.environment_factories is not None:
        multi = trainer._multi_environment
        trainer._batch_environments = [x.get("environment") if multi else None for x in rows]
        pools = trainer._extra_sample_environments  # name -> instances, reused across calls
        cursor: dict = {}
        for name in trainer._batch_environments:
            pool = pools.setdefault(name, [])
            if cursor.get(name, 0) == len(pool):
                pool.append(trainer.environment_factories[name]())
            environments.append(pool[cursor.get(name, 0)])
            cursor[name] = cursor.get(name, 0) + 1
    trainer.environments = environments or None
    trainer._sync_tool_dicts, trainer._async_tool_dicts = [], []
    for i in range(len(rows)):
        methods = []
        if environments:
            methods = [
                getattr(environments[i], member)
                for member, _ in inspect.getmembers(type(environments[i]), predicate=inspect.isfunction)
                if member not in ("reset", "get_reward") and not member.startswith("_")
            ]
        tools = trainer._standalone_tools + methods
        trainer._sync_tool_dicts.append({t.__name__: t for t in tools if not inspect.iscoroutinefunction(t)})
        trainer._async_tool_dicts.append({t.__name__: t for t in tools if inspect.iscoroutinefunction(t)})
    for i, (env, row) in enumerate(zip(environments, rows)):
        kwargs = {k: v for k, v in row.items() if k != "environment"} if trainer._multi_environment else row
        observation = env.reset(**kwargs)
        if isinstance(observation, str):  # text observations only (no images)
            last = prompts[i][-1]
            prompts[i] = [*prompts[i][:-1], {**last, "content": last["content"] + observation}]
    try:
        yield
    finally:
        for k in TOOL_BATCH_STATE:
            if k in saved:
                setattr(trainer, k, saved[k])
            else:
                vars(trainer).pop(k, None)


@contextmanager
def _sampling(trainer, temperature: float, num_generations: int):
    """Sample at `temperature`, `num_generations` per prompt, through TRL's path; keep the samples out of TRL's
    metrics."""
    hf = not trainer.use_vllm  # TRL builds a GenerationConfig and kwargs for HF generate, a VLLMGeneration for vLLM
    gen_config = trainer.generation_config if hf else None
    gen_kwargs = trainer.generation_kwargs if hf else None
    vllm = None if hf else trainer.vllm_generation
    saved_temperature, saved_generations = trainer.temperature, trainer.num_generations
    saved_config_temperature = gen_config.temperature if hf else None
    saved_kwargs = dict(gen_kwargs) if isinstance(gen_kwargs, dict) else None
    saved_vllm_temperature = None if hf else vllm.temperature
    saved_pending = trainer._pending_metrics, trainer._pending_extra_logs
    metrics = trainer._metrics["train"]
    lengths = {k: len(v) for k, v in metrics.items()}
    # The trainer's temperature is read by rollout backends; the generation config / kwargs by HF generate (TRL
    # passes both); vLLM reads its own copy.
    trainer.temperature, trainer.num_generations = temperature, num_generations
    if gen_config is not None:
        gen_config.temperature = temperature
    if saved_kwargs is not None:
        gen_kwargs["temperature"] = temperature
    if vllm is not None:
        vllm.temperature = temperature
    trainer._pending_metrics, trainer._pending_extra_logs = defaultdict(list), defaultdict(list)
    try:
        yield
    finally:
        trainer.temperature, trainer.num_generations = saved_temperature, saved_generations
        if gen_config is not None:
            gen_config.temperature = saved_config_temperature
        if saved_kwargs is not None:
            gen_kwargs.clear()
            gen_kwargs.update(saved_kwargs)
        if vllm is not None:
            vllm.temperature = saved_vllm_temperature
        trainer._pending_metrics, trainer._pending_extra_logs = saved_pending
        for k in list(metrics):
            if k not in lengths:
                del metrics[k]
            else:
                del metrics[k][lengths[k] :]
