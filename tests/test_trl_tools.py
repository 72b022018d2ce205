"""TRL's own multi-turn API (`environment_factory`, `tools`) with EPOTrainer / AEPOTrainer, and our environments
as TRL environments. Generation is the scripted tool-calling policy of tool_policy.py; the tool loop, parsing,
tool masks and rewards are TRL's, the trainers ours."""

import math
import os

import pytest
import torch
from datasets import Dataset
from envs_for_tests import replay_tool_calls
from helpers import tiny_args
from tool_policy import (
    Counter,
    Doubler,
    ScriptedToolPolicy,
    admissible_call,
    any_call,
    increment_call,
    turn_segments,
)

from epo_trl import AEPOConfig, AEPOTrainer, EPOConfig, EPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PROMPT = [{"role": "user", "content": "count up"}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    from epo_trl.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tool_model")), ["increment", "double", "count", "step"],
                            tool_calling=True)  # fmt: skip


def _args(cls, out, **kw):
    base = dict(max_completion_length=160, max_steps=3, learning_rate=0.0, entropy_coef=0.01)
    if cls is EPOConfig:  # a zero-width band: every token pays |H - H_ref| from step 2 on
        base.update(smoothing_coef=1.0, smoothing_kappa_low=1.0, smoothing_kappa_high=1.0)
    return tiny_args(cls, out, **{**base, **kw})


def _record_batches(trainer) -> list[dict]:
    """Every micro-batch `_compute_loss` trains on (ids, masks), in order."""
    seen, inner = [], trainer._compute_loss

    def spy(model, inputs):
        seen.append({k: inputs[k].detach().clone() for k in
                     ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask") if k in inputs})  # fmt: skip
        return inner(model, inputs)

    trainer._compute_loss = spy
    return seen


def _hand_turn_entropies(model, batch) -> dict[int, float]:
    """Per-turn token-mean entropy of one batch, by hand: a plain forward, softmax entropy at every completion
    position, turns = runs of tool_mask == 1 found by a Python loop (no project code)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
    p = batch["prompt_ids"].size(1)
    logits = logits[:, p - 1 : -1]
    h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    sums, counts = {}, {}
    mask = batch["completion_mask"] * batch["tool_mask"]
    for r in range(ids.size(0)):
        for t, (a, b) in enumerate(turn_segments(mask[r].tolist())):
            sums[t] = sums.get(t, 0.0) + h[r, a:b].sum().item()
            counts[t] = counts.get(t, 0) + (b - a)
    return {t: sums[t] / counts[t] for t in sums}


def test_epo_environment_factory_turns_are_assistant_segments(tool_model, tmp_path):
    """EPOTrainer + a single environment_factory through TRL's tool loop, 3 steps: per-turn entropies equal a hand
    computation over the assistant segments; tool results are outside every EPO term; the history holds them."""
    trainer = EPOTrainer(tool_model, None, args=_args(EPOConfig, tmp_path), train_dataset=Dataset.from_dict(
        {"prompt": [PROMPT] * 16}), environment_factory=Counter)  # fmt: skip
    policy = ScriptedToolPolicy(trainer, increment_call)
    batches = _record_batches(trainer)
    trainer.train()
    tok = trainer.processing_class
    logs = [log for log in trainer.state.log_history if "epo/num_turns" in log]
    assert len(logs) == len(batches) == 3
    assert len(policy.calls) > 3  # the tool loop re-generated after tool results
    calls_per_rollout = set()
    for batch, log in zip(batches, logs, strict=True):
        mask = (batch["completion_mask"] * batch["tool_mask"]).long()
        for r in range(mask.size(0)):
            ids = batch["completion_ids"][r]
            runs = turn_segments(mask[r].tolist())
            calls = tok.decode(ids[batch["completion_mask"][r].bool()]).count("<tool_call>")
            assert len(runs) == calls + 1  # one assistant segment per tool call, plus the final answer
            calls_per_rollout.add(calls)
            tool_text = tok.decode(ids[(batch["tool_mask"][r] == 0) & (batch["completion_mask"][r] == 1)])
            assert tool_text.count("<tool_response>") == calls and "<tool_call>" not in tool_text
        hand = _hand_turn_entropies(trainer.model, batch)
        assert log["epo/num_turns"] == len(hand)
        for t, value in hand.items():
            assert math.isclose(log[f"epo/turn_entropy/{t}"], value, rel_tol=1e-4), (t, log, hand)
    assert len(calls_per_rollout) >= 3  # rollouts made different numbers of calls
    # The smoothing history is the per-turn means of the steps (EMA-free: `epo/ref_entropy_mean` reads it).
    history = trainer.entropy_history.state_dict()
    assert history["num_steps"] == 3
    assert sorted(int(t) for t in history["turns"]) == list(range(max(len(_hand_turn_entropies(trainer.model, b))
                                                                      for b in batches)))  # fmt: skip
    assert all(log["epo/smooth_penalty"] >= 0 for log in logs) and logs[-1]["epo/smooth_penalty"] > 0
    # EPO's term on the last batch ignores whatever sits on tool-result tokens: huge entropies there change nothing.
    from epo_trl.trainers.grpo.grpo_trainer import ActionTokens
    from epo_trl.trainers.grpo.turn_math import turn_ids_from_mask

    batch = batches[-1]
    mask = batch["completion_mask"] * batch["tool_mask"]
    h = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8

    def epo_term(entropies):
        tokens = ActionTokens(logps=torch.zeros_like(h), entropies=entropies, mask=mask,
                              turn_ids=turn_ids_from_mask(mask), accumulation=1.0, entropy_coef=0.01)  # fmt: skip
        return trainer.method_loss(trainer.model, batch, tokens)

    trainer.model.eval()
    on_tools = (batch["tool_mask"] == 0) & (batch["completion_mask"] == 1)
    assert on_tools.any() and epo_term(h) > 0
    assert epo_term(h) == epo_term(torch.where(on_tools, h + 100.0, h))
    assert epo_term(h) != epo_term(torch.where(mask.bool(), h + 1.0, h))  # ... while action tokens count


def test_epo_dict_environment_factory_and_standalone_tools(tool_model, tmp_path):
    """The dict form routes rows by their `environment` column, each rendered with its own tools; standalone
    `tools` sit beside them. Rewards are each env's own `get_reward`, NaN-free per row."""
    seen = []

    def log_reward(completions, environments, **kw):  # a reward function beside the envs' own
        seen.append([type(e).__name__ for e in environments])
        return [0.0] * len(completions)

    def noop() -> str:
        """Do nothing."""
        return "ok"

    ds = Dataset.from_dict({"prompt": [PROMPT] * 16, "environment": (["counter"] * 4 + ["doubler"] * 4) * 2})
    trainer = EPOTrainer(tool_model, log_reward, args=_args(EPOConfig, tmp_path, max_steps=4), train_dataset=ds,
                         environment_factory={"counter": Counter, "doubler": Doubler}, tools=[noop])  # fmt: skip
    ScriptedToolPolicy(trainer, any_call)
    trainer.train()
    assert {tuple(sorted(set(s))) for s in seen} == {("Counter",), ("Doubler",)}  # one env per group
    logs = [log for log in trainer.state.log_history if "epo/num_turns" in log]
    assert len(logs) == 4 and max(log["epo/num_turns"] for log in logs) >= 2
    assert any(log.get("rewards/Doubler/mean", 0) >= 2 for log in logs)  # doubled at least once


@pytest.mark.parametrize("form", ["environment_factory", "tools"])
def test_aepo_resamples_run_the_tool_loop(tool_model, tmp_path, form):
    """AEPOTrainer, 3 steps, with an environment_factory or standalone tools: the re-samples play TRL's tool loop
    (with an env: on instances of their own, reset with their row), are scored and kept out of TRL's metrics."""
    calls = []

    def increment(step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        calls.append(step)
        return f"count {step}"

    def count_calls(completions, **kw):
        return [float(sum(bool(m.get("tool_calls")) for m in c)) for c in completions]

    kwargs = {"environment_factory": Counter} if form == "environment_factory" else {"tools": [increment]}
    reward = None if form == "environment_factory" else count_calls
    args = _args(AEPOConfig, tmp_path, max_steps=3, aepo_num_resamples=6)
    trainer = AEPOTrainer(tool_model, reward, args=args, train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 12}),
                          **kwargs)  # fmt: skip
    ScriptedToolPolicy(trainer, increment_call)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "aepo/kept" in log]
    assert len(logs) == 3 and all(0 < log["aepo/kept"] <= log["aepo/candidates"] < 6 for log in logs)  # above-mean
    assert [log["aepo/temperature"] for log in logs] == [1.2, 0.8, 0.8]  # (A1): no entropy yet, then H > H*
    assert all(log["aepo/reg_loss"] > 0 for log in logs)
    assert len(trainer.state.log_history) == 4  # 3 steps + the summary: the re-samples' metrics were dropped
    if form == "environment_factory":
        pool = trainer._extra_sample_environments[None]  # sample_more's instances
        assert len(pool) == 6 and not any(e is t for e in pool for t in trainer._environment_pool[None])
        assert any(e.count > 0 for e in pool)  # the re-samples called the tool on their own instances
    else:  # more calls than the training batches made: the re-samples called the tool too
        assert len(calls) > sum(log["tools/call_frequency"] * 4 for log in logs)


def test_epo_tool_run_resumes_exactly(tool_model, tmp_path):
    """Stop after 2 of 4 steps, resume: the entropy history and the weights equal the uninterrupted run's."""

    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):  # the run dies right after its step-2 checkpoint
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 2

    def run(out, resume=None, callbacks=None):
        args = _args(EPOConfig, out, max_steps=4, learning_rate=5e-2, save_strategy="steps", save_steps=2)
        trainer = EPOTrainer(tool_model, None, args=args, train_dataset=Dataset.from_dict(
            {"prompt": [PROMPT] * 16}), environment_factory=Counter, callbacks=callbacks)  # fmt: skip
        ScriptedToolPolicy(trainer, increment_call)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    assert run(tmp_path / "part", callbacks=[StopAt2()]).state.global_step == 2
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed.entropy_history.state_dict() == full.entropy_history.state_dict()
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_hold_identical_histories_with_tools(tool_model, tmp_path_factory):
    from scripts.epo_steps import load_run, run_once

    (r0, r1), (p0, p1) = load_run(run_once("multi_gpu", tool_model, tmp_path_factory, mode="tools"))
    assert r0["world"] == 2 and set(r0["prompts"]) != set(r1["prompts"])
    assert r0["history"] == r1["history"] and r0["history"]["num_steps"] == 3
    assert len(r0["history"]["turns"]) >= 2
    assert all(torch.equal(p0[name], p1[name]) for name in p0)


# --- our environments as TRL environments --------------------------------------------------------------------------
def _train_plain_grpo(factory, tmp_path, max_turns, steps=3, **kw):
    from trl import GRPOConfig, GRPOTrainer

    from epo_trl.envs.trl_env import tool_dataset, trl_environment

    records = []

    def spy(completions, task, environments, **kwargs):
        """Records (task, completion, env reward); scores 0.01 per message (a user's shaping term beside the env's
        sparse reward, so groups whose rollouts all lose still have advantages and the weights move)."""
        records.extend(zip(task, completions, [e.get_reward() for e in environments], strict=True))
        return [0.01 * len(c) for c in completions]

    args = tiny_args(GRPOConfig, tmp_path, max_steps=steps, max_completion_length=1024, **kw)
    trainer = GRPOTrainer(_adapter_model(tmp_path, factory), spy, args=args,
                          train_dataset=tool_dataset(factory, limit=8),
                          environment_factory=trl_environment(factory, max_turns=max_turns))  # fmt: skip
    ScriptedToolPolicy(trainer, admissible_call, stop_probability=0.05)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    return trainer, records, changed


def _adapter_model(tmp_path, factory):
    from epo_trl.models.tiny import build_tiny_model, env_words

    return build_tiny_model(str(tmp_path / "model"), env_words(factory), tool_calling=True)


def test_plain_grpo_trains_on_the_maze_through_the_adapter(tmp_path):
    from epo_trl.envs.maze import MazeFactory

    factory = MazeFactory(size=2, task="reach")
    trainer, records, changed = _train_plain_grpo(factory, tmp_path, max_turns=8)
    assert changed and len(records) == 3 * 4
    for task, completion, reward in records:
        assert reward == float(replay_tool_calls(factory, task, completion, 8))
    assert {r for _, _, r in records} == {0.0, 1.0}  # some random walks reach the goal, some do not
    groups = [records[i : i + 4] for i in range(0, len(records), 4)]
    assert all(len({t for t, _, _ in g}) == 1 for g in groups)  # a GRPO group plays one task instance
    logs = [log for log in trainer.state.log_history if "rewards/MazeEnvironment/mean" in log]
    assert len(logs) == 3 and all(log["tools/call_frequency"] > 1 for log in logs)


def test_plain_grpo_on_an_alfworld_game_and_the_expert_wins(alfworld_factory, tmp_path):
    from epo_trl.envs import TaskSpec
    from epo_trl.envs.trl_env import trl_environment

    trainer, records, changed = _train_plain_grpo(alfworld_factory, tmp_path, max_turns=4, steps=2)
    assert changed and len(records) == 8
    for task, completion, reward in records:
        assert reward == float(replay_tool_calls(alfworld_factory, task, completion, 4))
    # The expert's plan through the adapter's tool wins, and get_reward says so.
    env = trl_environment(alfworld_factory)()
    task = alfworld_factory.tasks("train")[0]
    text = env.reset(task=task.key())
    assert "Goal:" in text and "Admissible actions:" in text
    for _ in range(50):
        if env.done:
            break
        env.act(env._env.expert_plan()[0])
    assert env.won and env.get_reward() == 1.0 and TaskSpec.parse(task.key()) == task


def test_adapter_errors_and_crash_recovery(caplog):
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.envs.trl_env import trl_environment

    factory = MazeFactory(size=2, task="reach")
    Env = trl_environment(factory, max_turns=2)
    env = Env()
    with pytest.raises(ValueError, match=r"without a 'task' column.*tool_dataset"):
        env.reset(prompt="x")
    task = factory.tasks()[0].key()
    env.reset(task=task)
    assert "not a valid action" in env.act("   ")
    assert "episode is over" in env.act("go nowhere") and env.done  # max_turns = 2
    with pytest.raises(ValueError, match="stop calling tools"):
        env.act("go north")
    live = env._env

    def boom(action):
        raise RuntimeError("engine died")

    env.reset(task=task)
    assert env._env is live  # reused across resets
    live.step = boom
    assert "environment failed: engine died" in env.act("go north")
    assert env.get_reward() is None and env._env is None  # reported, never scored
    assert any("crashed (engine died)" in r.message for r in caplog.records)
    env.reset(task=task)
    assert env._env is not None and env._env is not live and env.get_reward() == 0.0


def test_adapter_reports_terminated_and_truncated():
    """Through TRL's adapter: the task ending an episode (terminated), the env's own step limit and the adapter's
    `max_turns` cutting one off (truncated), and the env's rewards summed in `env_return`."""
    from envs_for_tests import ScriptedFactory, task

    from epo_trl.envs.trl_env import trl_environment

    env = trl_environment(ScriptedFactory(), max_turns=3)()
    outcomes = {}
    for kind, steps in (("count", 2), ("limit", 2), ("count", 5)):
        env.reset(task=task(kind, steps).key())
        while not env.done:
            last = env.act("go")
        outcomes[kind, steps] = (env.terminated, env.truncated, env.won, env.turns, env.env_return, env.get_reward())
        assert "The episode is over" in last
    assert outcomes == {
        ("count", 2): (True, False, True, 2, 1.0, 1.0),
        ("limit", 2): (False, True, False, 2, 1.0, 0.0),  # the env's limit: 0.5 a step, no outcome
        ("count", 5): (False, True, False, 3, 0.0, 0.0),  # the adapter's max_turns
    }
    env.reset(task=task("old_shape", 1).key())
    assert "(observation, reward, terminated, truncated, info)" in env.act("go") and env.get_reward() is None
