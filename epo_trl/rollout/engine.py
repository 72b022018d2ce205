"""The lockstep multi-turn rollout engine.

Every turn, the prompts of all still-active episodes go to the generation backend in ONE batched call; the
parsed actions are applied to the episodes' environments in parallel (threads or worker processes: `workers.py`);
finished episodes drop out; the loop ends when every episode is done or out of budget. With a `lockstep`
backend (vLLM server mode, sharded HF models) the loop also keeps every rank making the same calls with the
same number of prompts, padding with dummy prompts, until no rank has an active episode.

Failed episodes (the env raised or hung past `step_timeout_s`): the env is discarded and replaced, the
episode ends with `failed=True`, return 0 and not won. They are EXCLUDED from learning (no advantage, NaN in
group statistics, like TRL's unscorable completions) and COUNTED in `rollout/env_failures` and as lost in
`rollout/success_rate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import closing, nullcontext
from typing import Any

from ..envs.pool import create_pool
from ..envs.protocol import EnvFactory, TaskSpec
from .backends.base import GenerationBackend, RankSync
from .config import MODES, RolloutConfig
from .episode import Episode, RolloutResult, Turn
from .parsing import ActionParser
from .prompts import PromptBuilder


class RolloutEngine:
    """Plays episodes of TaskSpecs with a generation backend; builds the token streams both sample modes need."""

    def __init__(self, factory: EnvFactory, tokenizer, config: RolloutConfig | None = None):
        self.factory, self.tokenizer = factory, tokenizer
        self.config = config or RolloutConfig()
        c = self.config
        self.parser = ActionParser(c.action_tags, c.think_tags, c.require_think, c.require_tags)
        self.prompts = PromptBuilder(tokenizer, factory.prompt_header, self.parser, c.prompt_history_pairs)
        self.pool = create_pool(factory, c.num_workers, c.step_timeout_s, c.env_workers, urls=c.env_server_urls)
        # Fallback for backends that declare no EOS ids; trainer backends carry the trainer's `eos_token_ids`.
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])

    def close(self) -> None:
        self.pool.close()

    # ----- episode lifecycle -------------------------------------------------------------------------------
    def _fail(self, episode: Episode, error: BaseException) -> None:
        episode.failed = True
        episode.failure = f"{type(error).__name__}: {error}"
        self.pool.discard(episode.env)
        episode.env = None

    def _finish(self, episode: Episode) -> None:
        if episode.env is not None:
            self.pool.release(episode.env)
            episode.env = None

    def _reset_all(self, episodes: list[Episode]) -> None:
        for e in episodes:
            e.env = self.pool.acquire()
        for e, (ok, value) in zip(episodes, self.pool.reset([(e.env, e.task) for e in episodes])):
            if not ok:
                self._fail(e, value)
                continue
            e.observation, e.goal, e.admissible = value["obs"], value["goal"], value["admissible"]

    def _step_all(self, pairs: list[tuple[Episode, str]]) -> None:
        """Apply each episode's action text (`project_action`, then `step` if accepted) next to its env.

        A raising `project_action` fails its episode like a raising `step`; one it rejects is an invalid turn.
        """
        for (e, _), (ok, value) in zip(pairs, self.pool.act([(e.env, text) for e, text in pairs])):
            if not ok:
                self._fail(e, value)
                continue
            turn = e.turns[-1]
            if value["action"] is None:
                turn.error = "the env did not accept the action"
                self._invalid_turn(e)
                continue
            turn.action, turn.env_reward = value["action"], value["reward"]
            e.history.append((e.observation, turn.action))
            e.observation, e.admissible = value["obs"], value["admissible"]
            if value["terminated"]:
                e.terminated, e.won = True, value["won"]
            elif value["truncated"]:
                e.truncated = "env_limit"

    @staticmethod
    def _invalid_turn(e: Episode) -> None:
        """No env step: the agent sees the same observation with a note."""
        e.history.append((e.observation, "invalid action"))
        e.observation = f"invalid action . {e.observation.removeprefix('invalid action . ')}"

    # ----- prompts -----------------------------------------------------------------------------------------
    def _step_prompt(self, e: Episode) -> list[int] | None:
        """This turn's prompt; the history shrinks to fit `max_prompt_tokens`; None = it cannot fit."""
        budget = self.config.max_prompt_tokens
        for window in range(min(self.config.prompt_history_pairs, len(e.history)), -1, -1):
            history = e.history[len(e.history) - window :] if window else []
            text = self.prompts.turn_text(e.goal, len(e.turns), e.observation, e.admissible, history)
            ids = self.prompts.encode_prompt(text)
            if budget is None or len(ids) <= budget:
                return ids
        return None

    def _trajectory_context(self, e: Episode) -> list[int] | None:
        if not e.prompt_ids:
            text = self.prompts.turn_text(e.goal, 0, e.observation, e.admissible)
            e.prompt_ids = self.prompts.encode_prompt(text)
        context = e.prompt_ids + e.completion_ids
        budget = self.config.max_trajectory_tokens
        if budget is not None and len(context) + self.config.max_turn_tokens > budget:
            return None
        return context

    # ----- the loop ----------------------------------------------------------------------------------------
    def run(
        self,
        tasks: Sequence[TaskSpec],
        backend: GenerationBackend,
        mode: str = "step",
        sync: RankSync | None = None,
        temperature: float | None = None,
    ) -> RolloutResult:
        """Play one episode per task (lockstep turns) and return them with timings.

        `temperature`: the sampling temperature (None = the backend's). Trainer rollouts pass the trainer's
        `temperature` (or the one AEPO sets for its re-samples): the trainer scores samples at it.
        """
        if mode not in MODES:
            raise ValueError(f"Unknown rollout mode {mode!r}; use one of {MODES}.")
        c, sync = self.config, sync or RankSync()
        # One source of truth for "the turn ended": the ids the backend cuts at (the trainer's eos_token_ids).
        eos_ids = set(getattr(backend, "eos_ids", None) or self.eos_ids)
        episodes = [Episode(task=t) for t in tasks]
        result = RolloutResult(episodes)
        t0 = time.perf_counter()
        self._reset_all(episodes)
        result.env_time_s += time.perf_counter() - t0
        dummy: list[int] | None = None
        while True:
            active, prompts = [], []
            for e in episodes:
                if e.finished:
                    continue
                if len(e.turns) >= c.max_turns:
                    e.truncated = "turn_limit"
                    continue
                ids = self._step_prompt(e) if mode == "step" else self._trajectory_context(e)
                if ids is None:
                    e.truncated = "context"
                    continue
                active.append(e)
                prompts.append(ids)
            for e in episodes:
                if e.finished:
                    self._finish(e)
            if backend.lockstep:
                # Collective backend: all ranks call with the same number of prompts while ANY rank is active.
                width = sync.max_int(len(prompts))
                if width == 0:
                    break
                dummy = dummy or (prompts[0] if prompts else None) or [self.tokenizer.pad_token_id]
                prompts = prompts + [dummy] * (width - len(prompts))
            elif not prompts:
                break
            t0 = time.perf_counter()
            gen = backend.generate(prompts, c.max_turn_tokens, temperature)
            result.gen_time_s += time.perf_counter() - t0
            result.backend_calls += 1
            if len(gen.completion_ids) != len(prompts):
                raise RuntimeError(
                    f"The generation backend returned {len(gen.completion_ids)} completions for {len(prompts)} "
                    "prompts; a backend must return exactly one completion per prompt."
                )
            to_step = []
            for i, e in enumerate(active):
                ids = list(gen.completion_ids[i])
                lps = list(gen.logprobs[i]) if gen.logprobs is not None else [0.0] * len(ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                parsed = self.parser(text)
                turn = Turn(
                    prompt_ids=prompts[i] if mode == "step" else [],
                    completion_ids=ids,
                    logprobs=lps,
                    text=text,
                    action=None,  # set by _step_all once the env accepts it (`project_action` runs next to the env)
                    error=parsed.error,
                    hit_token_limit=not ids or ids[-1] not in eos_ids,
                    context_tokens=len(prompts[i]),
                )
                e.turns.append(turn)
                if parsed.valid:
                    to_step.append((e, parsed.text))
                else:
                    self._invalid_turn(e)
            t0 = time.perf_counter()
            if to_step:
                self._step_all(to_step)
            result.env_time_s += time.perf_counter() - t0
            for e in active:
                self._after_turn(e, mode)
        for e in episodes:
            self._finish(e)
        return result

    def _after_turn(self, e: Episode, mode: str) -> None:
        turn = e.turns[-1]
        if not e.failed:
            turn.observation = e.observation
        if mode != "trajectory":
            return
        e.completion_ids += turn.completion_ids
        e.env_mask += [1] * len(turn.completion_ids)
        e.logprobs += turn.logprobs
        if e.finished or len(e.turns) >= self.config.max_turns:
            return  # the row ends with the last action: no observation follows
        text = self.prompts.observation_text(len(e.turns), e.observation, e.admissible)
        # The chat template closes the turn with the tokenizer's EOS; only a turn that already ends in it skips it.
        ended = bool(turn.completion_ids) and turn.completion_ids[-1] == self.tokenizer.eos_token_id
        tail = self.prompts.continuation_ids(text, ended_with_eos=ended)
        budget = self.config.max_trajectory_tokens
        if budget is not None and len(e.prompt_ids) + len(e.completion_ids) + len(tail) > budget:
            e.truncated = "context"
            return
        e.completion_ids += tail
        e.env_mask += [0] * len(tail)
        e.logprobs += [0.0] * len(tail)


def rollout_metrics(result: RolloutResult, config: RolloutConfig) -> dict[str, float]:
    """Local sums of the rollout metrics (reduce with `reduce_metrics` across ranks)."""
    eps = result.episodes
    turns = [t for e in eps for t in e.turns]
    return {
        "episodes": float(len(eps)),
        "won": float(sum(e.won for e in eps)),
        "return": float(sum(e.episode_return(config) for e in eps)),
        "length": float(sum(len(e.turns) for e in eps)),
        "turns": float(len(turns)),
        "invalid": float(sum(t.action is None for t in turns)),
        "truncated": float(sum(e.truncated is not None for e in eps)),
        "turn_truncated": float(sum(t.hit_token_limit for t in turns)),
        "context_tokens": float(sum(t.context_tokens for t in turns)),
        "failures": float(sum(e.failed for e in eps)),
        "env_time_s": result.env_time_s,
        "gen_time_s": result.gen_time_s,
    }


def reduce_metrics(sums: dict[str, float], accelerator=None) -> dict[str, float]:
    """Sum the local sums over ranks and turn them into the logged `rollout/*` metrics."""
    if accelerator is not None and accelerator.num_processes > 1:
        import torch

        keys = sorted(sums)
        local = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        total = accelerator.gather(local.unsqueeze(0)).sum(0).tolist()
        sums = dict(zip(keys, total))
        world = accelerator.num_processes
    else:
        world = 1
    n, turns = max(sums["episodes"], 1.0), max(sums["turns"], 1.0)
    return {
        "rollout/success_rate": sums["won"] / n,
        "rollout/mean_return": sums["return"] / n,
        "rollout/episode_length": sums["length"] / n,
        "rollout/invalid_action_rate": sums["invalid"] / turns,
        "rollout/truncation_rate": sums["truncated"] / n,
        "rollout/turn_truncation_rate": sums["turn_truncated"] / turns,
        "rollout/prompt_tokens_per_turn": sums["context_tokens"] / turns,
        "rollout/env_failures": sums["failures"],
        "rollout/env_time_s": sums["env_time_s"] / world,
        "rollout/gen_time_s": sums["gen_time_s"] / world,
    }


def log_rollout_metrics(trainer, result: RolloutResult, config: RolloutConfig) -> dict[str, float]:
    """Append the reduced rollout metrics to `trainer._metrics[mode]`; return them."""
    mode = "train" if trainer.model.training else "eval"
    metrics = reduce_metrics(rollout_metrics(result, config), trainer.accelerator)
    for key, value in metrics.items():
        trainer._metrics[mode][key].append(value)
    return metrics


def run_episodes(
    backend: GenerationBackend,
    factory: EnvFactory,
    tasks: Sequence[TaskSpec],
    tokenizer,
    config: RolloutConfig | None = None,
    mode: str = "step",
    temperature: float | None = None,
    engine: RolloutEngine | None = None,
) -> list[dict[str, Any]]:
    """Play `tasks` without a trainer (evaluation, benchmarks); one record per episode. `temperature`: None = the
    backend's. `engine`: an open engine to play on (its envs are reused; the caller closes it); None = a new one.

    Records: task, won, return, length, invalid, failed, failure, terminated, truncated, env_return, turns
    (text/action/observation/context_tokens).
    """
    with engine_for(factory, tokenizer, config, engine) as engine:
        return engine.run(tasks, backend, mode, temperature=temperature).records(engine.config)


def engine_for(factory: EnvFactory, tokenizer, config: RolloutConfig | None, engine: RolloutEngine | None = None):
    """Context manager over `engine` when given (left open: its owner closes it), else a new engine closed on exit."""
    return nullcontext(engine) if engine is not None else closing(RolloutEngine(factory, tokenizer, config))


def success_rate(records: Sequence[dict[str, Any]]) -> float:
    return sum(r["won"] for r in records) / len(records) if records else math.nan


class EnvRollout:
    """Shared plumbing of the trainer-facing rollouts: task keys -> episodes, backend choice, metrics.

    Args:
        factory: the environment factory whose TaskSpec keys are the dataset's prompts.
        config: budgets and scoring (`RolloutConfig`).
        backend: a fixed generation backend; None = the trainer's (vLLM when `use_vllm`, else HF generate).
        tokenizer: None = the trainer's `processing_class`.

    A subclass must set `mode` ("step": one training row per turn, `StepRollout`; "trajectory": one per episode,
    `TrajectoryRollout`): there is no default.
    """

    mode: str  # set by every subclass; checked in __init__

    def __init__(self, factory: EnvFactory, config: RolloutConfig | None = None, backend=None, tokenizer=None):
        mode = getattr(self, "mode", None)
        if mode not in MODES:
            raise TypeError(
                f"{type(self).__name__}.mode = {mode!r}: a rollout must set its sample mode, one of {MODES} "
                "(use StepRollout or TrajectoryRollout, or set `mode` on your EnvRollout subclass)."
            )
        self.factory, self.config = factory, config or RolloutConfig()
        self.backend, self.tokenizer = backend, tokenizer
        self.engine: RolloutEngine | None = None
        self.last_result: RolloutResult | None = None

    def _engine(self, trainer) -> RolloutEngine:
        if self.engine is None:
            tokenizer = self.tokenizer or getattr(trainer, "processing_class", None)
            if tokenizer is None:
                raise ValueError("No tokenizer: pass `tokenizer=` to the rollout or use it with a trainer.")
            self.engine = RolloutEngine(self.factory, tokenizer, self.config)
        return self.engine

    def play(self, prompts: Sequence[str], trainer) -> RolloutResult:
        """Parse the task keys, play one episode per prompt, log `rollout/*` metrics on the trainer."""
        from .backends import backend_for_trainer

        tasks = [TaskSpec.parse(p if isinstance(p, str) else p[-1]["content"]) for p in prompts]
        engine = self._engine(trainer)
        backend = self.backend or backend_for_trainer(trainer)
        sync = RankSync(getattr(trainer, "accelerator", None))
        # Sample at the trainer's current temperature: its own, or the one AEPO sets for its re-samples.
        temperature = getattr(trainer, "temperature", None)
        self.last_result = engine.run(tasks, backend, self.mode, sync, temperature=temperature)
        log_rollout_metrics(trainer, self.last_result, self.config)
        return self.last_result

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
