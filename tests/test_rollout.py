"""Rollout engine: lockstep turns, masks, groups, failures, trainer integration (offline, CPU)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from countdown_env import WORDS, CountdownFactory, CountingBackend, scripted_backend  # noqa: E402
from envs_for_tests import ScriptedFactory  # noqa: E402
from envs_for_tests import task as scripted_task  # noqa: E402

from epo_trl.envs.maze import MazeFactory  # noqa: E402
from epo_trl.envs.protocol import TaskSpec  # noqa: E402
from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of  # noqa: E402
from epo_trl.rollout import (  # noqa: E402
    ActionParser,
    HFBackend,
    PromptBuilder,
    RolloutConfig,
    RolloutEngine,
    StepRollout,
    TrajectoryRollout,
    VLLMBackend,
    episode_return_reward,
    run_episodes,
)


def vocabulary() -> list[str]:
    builder = PromptBuilder(build_tokenizer(), "header")
    return [
        *MazeFactory().vocabulary(),
        *words_of(builder.vocabulary_texts()),
        *WORDS,
        *words_of([CountdownFactory.prompt_header]),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocabulary())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), extra_words=vocabulary(), hidden_size=16)


def segments(ids, mask):
    """Consecutive runs of (mask value, token ids)."""
    out = []
    for token, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(token)
        else:
            out.append((m, [token]))
    return out


# ----- 1. lockstep turns and masks ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_one_call_per_turn_and_finished_episodes_drop_out(tokenizer, mode):
    factory = CountdownFactory()
    tasks = factory.tasks()  # 8 episodes needing 1..4 turns
    backend = CountingBackend(scripted_backend(tokenizer))
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=10, max_turn_tokens=16))
    result = engine.run(tasks, backend, mode)
    assert [len(e.turns) for e in result.episodes] == [t.variation for t in tasks]
    assert all(e.won and e.truncated is None for e in result.episodes)
    # one batched call per turn, with only the still-active episodes
    assert backend.calls == [8, 6, 4, 2]
    assert result.backend_calls == 4


def test_trajectory_env_mask_covers_exactly_the_observations(tokenizer):
    factory = CountdownFactory()
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=10, max_turn_tokens=16))
    result = engine.run(factory.tasks(), scripted_backend(tokenizer), "trajectory")
    for e in result.episodes:
        assert len(e.completion_ids) == len(e.env_mask) == len(e.logprobs)
        runs = segments(e.completion_ids, e.env_mask)
        generated = [ids for m, ids in runs if m == 1]
        observed = [ids for m, ids in runs if m == 0]
        assert generated == [t.completion_ids for t in e.turns]  # every generated token has mask 1
        assert len(observed) == len(e.turns) - 1  # an observation follows every turn but the last
        for ids, turn in zip(observed, e.turns):
            text = tokenizer.decode(ids)
            assert f"current observation : {turn.observation}" in text and "<action>" not in text
            assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.env_mask) if m == 0)


def test_real_tiny_model_hf_generate(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    factory = MazeFactory(size=2, task="reach")
    backend = CountingBackend(HFBackend(model, tok, temperature=1.0))
    config = RolloutConfig(max_turns=3, max_turn_tokens=6)
    engine = RolloutEngine(factory, tok, config)
    result = engine.run(factory.tasks()[:8], backend, "trajectory")
    assert len(backend.calls) == max(len(e.turns) for e in result.episodes)
    assert backend.calls[0] == 8 and backend.calls == sorted(backend.calls, reverse=True)
    for e in result.episodes:
        runs = segments(e.completion_ids, e.env_mask)
        assert [ids for m, ids in runs if m == 1] == [t.completion_ids for t in e.turns]
        for turn in e.turns:
            assert 1 <= len(turn.completion_ids) <= 6
            assert len(turn.logprobs) == len(turn.completion_ids)
            assert all(lp <= 0.0 for lp in turn.logprobs)
        for m, ids in runs:
            if m == 0:
                assert "current observation" in tok.decode(ids)


# ----- 2. groups ------------------------------------------------------------------------------------------------
def test_group_members_play_the_same_task_instance(tokenizer):
    factory = MazeFactory(size=3)
    keys = [t.key() for t in factory.tasks()[:2]]
    prompts = [keys[0]] * 4 + [keys[1]] * 4  # what TRL's RepeatSampler yields with num_generations=4
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=1, max_turn_tokens=8))
    result = engine.run([TaskSpec.parse(p) for p in prompts], scripted_backend(tokenizer), "step")
    first = [e.turns[0].prompt_ids for e in result.episodes]
    assert all(ids == first[0] for ids in first[:4]) and all(ids == first[4] for ids in first[4:])
    assert first[0] != first[4]
    assert [e.task.key() for e in result.episodes] == prompts


# ----- 4. invalid outputs and broken envs -----------------------------------------------------------------------
def test_parser_rejects_malformed_actions():
    parse = ActionParser()
    assert parse("<think> x </think> <action> go north </action>").text == "go north"
    assert not parse("go north").valid
    assert not parse("<action>   </action>").valid
    assert not parse("<action> 向北 </action>").valid
    assert ActionParser(require_think=True)("<action> go </action>").error.startswith("missing <think>")


def test_invalid_actions_are_penalised_and_counted(tokenizer):
    factory = CountdownFactory()
    config = RolloutConfig(max_turns=2, max_turn_tokens=16)
    records = run_episodes(
        scripted_backend(tokenizer, text="no tags here"), factory, factory.tasks()[:4], tokenizer, config
    )
    assert all(r["invalid"] == 2 and not r["won"] and r["truncated"] == "turn_limit" for r in records)
    assert all(r["return"] == pytest.approx(2 * config.invalid_penalty) for r in records)
    assert records[0]["turns"][1]["observation"].startswith("invalid action")
    assert all(log[0] == "reset" for log in factory.log)  # the env never got a step


def test_raising_and_hanging_envs_fail_the_episode_not_the_run(tokenizer):
    from epo_trl.rollout.engine import reduce_metrics, rollout_metrics

    factory = CountdownFactory()
    tasks = [TaskSpec("countdown", "count", 2, 0), TaskSpec("countdown", "raise", 2, 1)]
    tasks += [TaskSpec("countdown", "hang", 2, 2), TaskSpec("countdown", "count", 3, 3)]
    config = RolloutConfig(max_turns=5, max_turn_tokens=16, step_timeout_s=0.5, num_workers=2)
    engine = RolloutEngine(factory, tokenizer, config)
    result = engine.run(tasks, scripted_backend(tokenizer), "step")
    ok, raised, hung, ok2 = result.episodes
    assert ok.won and ok2.won and len(ok2.turns) == 3
    assert raised.failed and "scripted env failure" in raised.failure and not raised.won
    assert hung.failed and "TimeoutError" in hung.failure
    assert raised.episode_return(config) == 0.0
    metrics = reduce_metrics(rollout_metrics(result, config))
    assert metrics["rollout/env_failures"] == 2
    assert metrics["rollout/success_rate"] == 0.5
    # broken envs are closed and never reused: the next rollout gets fresh ones
    before = len(factory.made)
    engine.run(factory.tasks()[:4], scripted_backend(tokenizer), "step")
    assert all(e.closed for e in factory.made[:before] if e.task.task == "raise")
    assert len(factory.made) >= before


def test_raising_project_action_fails_only_its_episode(tokenizer):
    factory = ScriptedFactory()
    tasks = [scripted_task("count", 2, 0), scripted_task("project_raise", 2, 1), scripted_task("count", 2, 2)]
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=4, max_turn_tokens=16))
    try:
        ok, bad, ok2 = engine.run(tasks, scripted_backend(tokenizer), "step").episodes
    finally:
        engine.close()
    assert ok.won and ok2.won and not bad.won
    assert bad.failed and "scripted projection failure" in bad.failure


@pytest.mark.parametrize(
    "kind, field",
    [
        ("bad_won", "won"),
        ("bad_reward", "reward"),
        ("bad_obs", "observation"),
        ("bad_admissible", "admissible"),
        ("bad_goal", "goal"),
        ("bad_info", "info"),
        ("bad_project", "project_action"),
    ],
)
def test_garbage_from_an_env_fails_its_episode_naming_env_and_field(tokenizer, kind, field):
    factory = ScriptedFactory()
    tasks = [scripted_task("count", 1, 0), scripted_task(kind, 1, 1)]
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=3, max_turn_tokens=16))
    try:
        ok, bad = engine.run(tasks, scripted_backend(tokenizer), "step").episodes
    finally:
        engine.close()
    assert ok.won and not bad.won and bad.episode_return(engine.config) == 0.0
    assert bad.failed and "scripted" in bad.failure and field in bad.failure, bad.failure


def test_a_hung_env_does_not_keep_the_process_alive(tmp_path):
    """A rollout whose env never returns ends, and so does the interpreter (no engine.close(), as in a trainer)."""
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from envs_for_tests import WORDS, ScriptedFactory, task
from epo_trl.rollout import CallableBackend, RolloutConfig, RolloutEngine
from epo_trl.models.tiny import build_tokenizer

tok = build_tokenizer(WORDS)
ids = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
engine = RolloutEngine(ScriptedFactory(), tok, RolloutConfig(max_turns=3, step_timeout_s=0.5, num_workers=2))
result = engine.run([task("hang_forever"), task("count")], CallableBackend(lambda p, n, t: [ids for _ in p]))
print("failed:", [e.failed for e in result.episodes], flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed: [True, False]" in proc.stdout


def test_budgets_are_enforced_and_reported(tokenizer):
    from epo_trl.rollout.engine import reduce_metrics, rollout_metrics

    factory = CountdownFactory()
    tasks = [TaskSpec("countdown", "count", 4, 0)] * 2
    # per-turn token limit: the action is cut before its closing tag -> invalid, and the turn counts as truncated
    result = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=2, max_turn_tokens=3)).run(
        tasks, scripted_backend(tokenizer), "step"
    )
    metrics = reduce_metrics(rollout_metrics(result, RolloutConfig()))
    assert metrics["rollout/turn_truncation_rate"] == 1.0 and metrics["rollout/invalid_action_rate"] == 1.0
    assert metrics["rollout/truncation_rate"] == 1.0
    # the tokens read per turn: the step prompt itself (each turn reads its whole prompt)
    turns = [t for e in result.episodes for t in e.turns]
    assert all(t.context_tokens == len(t.prompt_ids) > 0 for t in turns)
    assert metrics["rollout/prompt_tokens_per_turn"] == sum(len(t.prompt_ids) for t in turns) / len(turns)
    # trajectory budget: the episode stops before the row could exceed it
    config = RolloutConfig(max_turns=4, max_turn_tokens=16, max_trajectory_tokens=150)
    result = RolloutEngine(factory, tokenizer, config).run(tasks, scripted_backend(tokenizer), "trajectory")
    for e in result.episodes:
        assert e.truncated == "context" and len(e.prompt_ids) + len(e.completion_ids) <= 150
        # trajectory mode: turn k reads the prompt plus every completion and observation token before it
        assert e.turns[0].context_tokens == len(e.prompt_ids)
        assert all(a.context_tokens + len(a.completion_ids) < b.context_tokens for a, b in zip(e.turns, e.turns[1:]))
        assert e.turns[-1].context_tokens + len(e.turns[-1].completion_ids) <= len(e.prompt_ids) + len(
            e.completion_ids
        )
    # step-mode prompt budget: the history shrinks first, then the episode is truncated
    engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=4, max_prompt_tokens=10))
    result = engine.run(tasks, scripted_backend(tokenizer), "step")
    assert all(e.truncated == "context" and not e.turns for e in result.episodes)


# ----- vLLM backend (single process) ---------------------------------------------------------------------------
def test_vllm_backend_colocate_through_trls_vllm_generation(tokenizer):
    from accelerate import Accelerator
    from vllm_standin import make_vllm_generation, vllm_standin

    ids = tokenizer("<action> go </action>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with vllm_standin(policy=lambda p: ids + [7, 7]) as standin:
        model = SimpleNamespace(name_or_path="scripted", named_modules=lambda: [])
        vllm = make_vllm_generation(model, Accelerator(cpu=True), tokenizer, mode="colocate", max_completion_length=16)
        backend = VLLMBackend(vllm, lockstep=False, eos_ids=[tokenizer.eos_token_id])
        factory = CountdownFactory()
        engine = RolloutEngine(factory, tokenizer, RolloutConfig(max_turns=10, max_turn_tokens=32))
        result = engine.run(factory.tasks(), backend, "trajectory")
    assert [n for kind, *n in standin.engines[0].events if kind == "generate"] == [[8], [6], [4], [2]]
    assert vllm.max_completion_length == 16  # restored after each call
    turn = result.episodes[0].turns[0]
    assert turn.completion_ids == ids and turn.logprobs == [-0.5] * len(ids)  # cut at EOS


# ----- 3. training with TRL trainers ----------------------------------------------------------------------------
def grpo_args(tmp_path, config_cls=None, **overrides):
    from trl import GRPOConfig

    config_cls = config_cls or GRPOConfig
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
    )
    options.update(overrides)
    return config_cls(**options)


def test_trajectory_mode_trains_with_plain_grpo_trainer(tiny_model_dir, tmp_path):
    from trl import GRPOTrainer

    from epo_trl.envs import task_dataset

    factory = MazeFactory(size=2, task="reach")
    rollout = TrajectoryRollout(factory, RolloutConfig(max_turns=3, max_turn_tokens=8))
    trainer = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=[episode_return_reward],
        args=grpo_args(tmp_path),
        train_dataset=task_dataset(factory),
        rollout_func=rollout,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    assert len(logs) == 2 and all("rewards/episode_return_reward/mean" in h for h in logs)
    assert trainer.state.global_step == 2


class HookedGRPOTrainer:
    """Built lazily (TRL import is slow): GRPOTrainer + the 3-line step-mode hook MultiTurnGRPOTrainer also has."""

    @staticmethod
    def make(**kwargs):
        from trl import GRPOTrainer

        class Trainer(GRPOTrainer):
            seen_turn_ids: list = []

            def _generate_and_score_completions(self, inputs):
                if getattr(self.rollout_func, "mode", None) == "step":
                    from epo_trl.trainers.grpo import step_batch

                    batch = step_batch.build_training_batch(self.rollout_func, inputs, self)
                    Trainer.seen_turn_ids.append(batch["turn_ids"].tolist())
                    return batch
                return super()._generate_and_score_completions(inputs)

        return Trainer(**kwargs)


def test_step_mode_trains_and_rows_carry_turn_ids(tiny_model_dir, tmp_path):
    from epo_trl.envs import task_dataset

    factory = CountdownFactory()
    rollout = StepRollout(
        factory,
        RolloutConfig(max_turns=4, max_turn_tokens=12),
        backend=scripted_backend(build_tokenizer(vocabulary())),
    )
    trainer = HookedGRPOTrainer.make(
        model=tiny_model_dir,
        reward_funcs=[episode_return_reward],
        args=grpo_args(tmp_path, per_device_train_batch_size=8, num_generations=4, steps_per_generation=3),
        train_dataset=task_dataset(factory),
        rollout_func=rollout,
    )
    trainer.train()
    # every turn of every episode is one row; rows are padded to a multiple of steps_per_generation=3
    turn_ids = trainer.seen_turn_ids[-1]
    episodes = rollout.last_result.episodes
    assert len(episodes) == 8 * 3  # per_device_train_batch_size x steps_per_generation
    num_rows = sum(len(e.turns) for e in episodes)
    assert len(turn_ids) == -(-num_rows // 3) * 3
    assert sorted(turn_ids[:num_rows]) == sorted(t for e in episodes for t in range(len(e.turns)))
    assert trainer.state.global_step == 2


def test_step_batch_advantages_and_padding(tiny_model_dir, tmp_path):
    from epo_trl.trainers.grpo import step_batch

    """Rows get their episode's group-normalised return; dummy rows are fully masked; failed episodes get 0."""
    from epo_trl.envs import task_dataset

    factory = CountdownFactory()
    tok = build_tokenizer(vocabulary())
    good = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bad = tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    calls = {"n": 0}

    def policy(prompts, n, t):  # the second half of every group writes invalid actions on turn 1
        calls["n"] += 1
        return [good if (i % 4 < 2 or calls["n"] > 1) else bad for i in range(len(prompts))]

    from epo_trl.rollout import CallableBackend

    rollout = StepRollout(factory, RolloutConfig(max_turns=4, max_turn_tokens=12), backend=CallableBackend(policy))
    trainer = HookedGRPOTrainer.make(
        model=tiny_model_dir,
        reward_funcs=[episode_return_reward],
        args=grpo_args(
            tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2, max_steps=1
        ),
        train_dataset=task_dataset(factory),
        rollout_func=rollout,
    )
    tasks = [TaskSpec("countdown", "count", 2, 0).key()] * 4
    trainer.model.train()
    batch = step_batch.build_training_batch(rollout, [{"prompt": k} for k in tasks], trainer)
    n = batch["advantages"].numel()
    assert n % 2 == 0 and list(batch)[0] == "prompt_ids"
    # members 0,1 won in 2 turns (R=10), members 2,3 wasted turn 0 (R=9.9): positive vs negative advantages
    adv = batch["advantages"][:10].tolist()
    real = int((batch["completion_mask"].sum(1) > 0).sum())
    assert real == 2 + 2 + 3 + 3
    assert all(a > 0 for a in adv[:4]) and all(a < 0 for a in adv[4:real])
    assert batch["completion_mask"][real:].sum() == 0 and batch["advantages"][real:].abs().sum() == 0
    assert int(batch["num_items_in_batch"]) == int(batch["completion_mask"].sum())
    # steps_per_generation (2) > gradient_accumulation_steps (1): samples are reused off-policy, as in TRL
    assert batch["old_per_token_logps"].shape == batch["completion_ids"].shape
    assert trainer._metrics["train"]["rollout/success_rate"][-1] == 1.0


def test_step_mode_trains_with_epo_trainer(tiny_model_dir, tmp_path):
    """EPOTrainer on a step-mode rollout of a scripted policy whose every episode's outcome is known.

    Countdown task n ends (won) after n valid actions. Members 0, 1 of each group act validly from turn 0 (n turns,
    return 10); members 2, 3 write an invalid action on turn 0 first (n + 1 turns, return 10 - 0.1 = 9.9).
    """
    import torch

    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.envs import task_dataset
    from epo_trl.rollout import CallableBackend

    tok = build_tokenizer(vocabulary())
    good = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    bad = tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def policy(prompts, n, t):  # a turn-0 call holds whole groups of 4, in order
        first = ["you are now at step 1 ." in tok.decode(p) for p in prompts]
        return [bad if (f and i % 4 >= 2) else good for i, f in enumerate(first)]

    factory = CountdownFactory()
    rollout = StepRollout(factory, RolloutConfig(max_turns=6, max_turn_tokens=12), backend=CallableBackend(policy))
    args = grpo_args(tmp_path, config_cls=EPOConfig)
    trainer = EPOTrainer(
        model=tiny_model_dir,
        reward_funcs=[episode_return_reward],
        args=args,
        train_dataset=task_dataset(factory),
        rollout_func=rollout,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    assert len(logs) == 2
    for h in logs:
        n = round(h["rollout/episode_length"] - 0.5)  # the task's count
        assert n in (1, 2, 3, 4) and h["rollout/episode_length"] == n + 0.5  # (n + n + (n + 1) + (n + 1)) / 4
        assert h["rollout/success_rate"] == 1.0
        assert h["rollout/mean_return"] == pytest.approx(9.95)
        assert h["reward_std"] == pytest.approx(0.05 * 2 / 3**0.5, rel=1e-4)  # std of (10, 10, 9.9, 9.9)
        assert h["rollout/invalid_action_rate"] == pytest.approx(2 / (4 * n + 2))
        assert h["rollout/rows"] == 4 * n + 2  # one row per turn
        assert h["epo/num_turns"] == n + 1
        assert sorted(k for k in h if k.startswith("epo/turn_entropy/")) == [
            f"epo/turn_entropy/{t}" for t in range(n + 1)
        ]
    assert logs[0]["epo/beta"] == 1.0 and logs[1]["epo/beta"] < 1.0  # the phase schedule decays
    # EPO's per-turn entropy history: none at step 1; at step 2 the reference is step 1's per-turn means
    assert "epo/ref_entropy_mean" not in logs[0]
    first = [v for k, v in logs[0].items() if k.startswith("epo/turn_entropy/")]
    assert logs[1]["epo/ref_entropy_mean"] == pytest.approx(sum(first) / len(first), rel=1e-4)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))  # it trained


def test_a_rollout_names_its_mode_there_is_no_default():
    """`EnvRollout.mode` has no silent default: a subclass without a valid one fails at construction, naming both."""
    from epo_trl.rollout import StepRollout, TrajectoryRollout
    from epo_trl.rollout.engine import EnvRollout

    class NoMode(EnvRollout):
        pass

    class Typo(EnvRollout):
        mode = "steps"

    for cls in (NoMode, Typo):
        with pytest.raises(TypeError, match=r"mode = .*'step', 'trajectory'"):
            cls(MazeFactory())
    assert StepRollout(MazeFactory()).mode == "step" and TrajectoryRollout(MazeFactory()).mode == "trajectory"
